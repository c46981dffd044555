"""The KV-cache indexer: which pod holds which block, from every agent's KV event stream.

Every replica consumes every pod's ``im.kv.<pool>.<pod>`` stream and ``im.pod.*.*`` heartbeats and
answers ``im.index.lookup`` (queue group ``indexer``) with each pod's longest cached prefix.
"""
