# The infermesh control-plane image: every service and tool, `infermesh <command>`.
#   docker build -t ghcr.io/infermesh/infermesh:0.1.0 .
# The charts (deploy/helm) run it as `infermesh <service> --config /etc/infermesh/<service>.yaml`
# and as the agent sidecar next to the upstream vLLM image; tests/unit/test_helm.py checks that
# every command and flag they use exists in the CLI (the image itself is built by release CI, not
# by the tests: no container runtime there).
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY infermesh ./infermesh
COPY proto ./proto
COPY libs ./libs
COPY services ./services
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN groupadd --gid 10001 infermesh \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /tmp infermesh
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# The tiny model (tokenizer and chat template, no weights): what the simulator serves and the
# tokenizer knows by default, so the charts' defaults work with no model volume.
ENV INFERMESH_MODEL_DIR=/opt/infermesh/tiny-model \
    PYTHONUNBUFFERED=1
RUN infermesh model "$INFERMESH_MODEL_DIR"
USER 10001:10001
# 8000: the ingress's and the simulator's HTTP; 9100: the other services' /health and /metrics;
# 9090: the autoscaler's KEDA external scaler (gRPC).
EXPOSE 8000 9100 9090
ENTRYPOINT ["infermesh"]
CMD ["--help"]
