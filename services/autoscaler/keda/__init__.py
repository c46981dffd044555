"""KEDA's external scaler, served by the autoscaler (``--keda-port``): the proto, its generated
stubs (``make keda-stubs``) and the servicer (:mod:`.server`)."""
