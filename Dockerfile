# One image for every embedshift process: the operator (`embedshift operator run`), its Jobs
# (`embedshift migrate …`) and the search service (`embedshift serve`).
#
#   make image                       # here: buildah, a debootstrapped Debian base (no registry)
#   docker build -t embedshift .     # anywhere with a registry: python:3.11-slim
#
# It runs as the numeric non-root uid 65532 (the operator's Jobs ask for it: RUN_AS_USER in
# operator/embedshift_operator/adapters/kube.py) with a read-only root filesystem: everything
# that writes (HOME, XDG dirs) points at /tmp, which the Pod mounts as an emptyDir.
ARG BASE=python:3.11-slim

# ---- build: the project's wheel, nothing else ----------------------------------------------
FROM ${BASE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY rag_service ./rag_service
COPY operator/embedshift_operator ./operator/embedshift_operator
# The wheel, then a venv with it and its runtime dependencies (no dev extras); the runtime stage
# copies the venv alone, so pip's work, the sources and the wheel stay in this stage. A venv:
# Debian's own python3 refuses pip outside one (PEP 668); the slim image does not mind it.
# pip is removed from the venv afterwards: nothing installs at run time.
RUN python3 -m venv /tmp/build-venv \
    && /tmp/build-venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && python3 -m venv /opt/embedshift \
    && /opt/embedshift/bin/pip install --no-cache-dir /wheels/embedshift-*.whl \
    && /opt/embedshift/bin/pip uninstall --yes pip \
    && rm -rf /tmp/build-venv

# ---- runtime: the venv, a non-root user, labels ---------------------------------------
FROM ${BASE}
# HOME and the XDG dirs under /tmp: the only writable place with a read-only root filesystem.
# No .pyc written at run time (pip compiled them once, into the venv).
# EMBEDSHIFT_HOST: in a container the service must listen beyond loopback.
ENV PATH=/opt/embedshift/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/tmp/.cache \
    XDG_CONFIG_HOME=/tmp/.config \
    XDG_DATA_HOME=/tmp/.local/share \
    XDG_STATE_HOME=/tmp/.local/state \
    XDG_RUNTIME_DIR=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    EMBEDSHIFT_HOST=0.0.0.0
# Copied by content: a changed source rebuilds the venv, an unchanged one reuses this layer.
COPY --from=build /opt/embedshift /opt/embedshift
# A passwd entry for 65532: libpq and getpass look the user's name up.
RUN echo 'nonroot:x:65532:65532:nonroot:/tmp:/usr/sbin/nologin' >> /etc/passwd \
    && echo 'nonroot:x:65532:' >> /etc/group
USER 65532:65532
# Last: the revision and the date change on every build and must not void the cached layers above.
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
ARG BASE
LABEL org.opencontainers.image.title="embedshift" \
      org.opencontainers.image.description="Move a pgvector RAG corpus to a new embedding model without a big-bang cutover: the operator, its Jobs and the search service." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
WORKDIR /tmp
ENTRYPOINT ["embedshift"]
CMD ["--help"]
