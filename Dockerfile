# The one image every modelfleet service runs: `modelfleet api`, `modelfleet worker`, `modelfleet flower`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
COPY pyproject.toml README.md ./
COPY api ./api
COPY broker ./broker
COPY workers ./workers
COPY modelfleet ./modelfleet
# EXTRAS=cuda (the default) adds the CUDA runtime and cuBLAS that GPU nodes offload layers with (about 1 GB);
# `--build-arg EXTRAS=` builds a smaller CPU-only image.
ARG EXTRAS=cuda
RUN pip install ".${EXTRAS:+[$EXTRAS]}" && rm -rf /src

# A node keeps its key (and so its fingerprint) in /var/lib/modelfleet, inside the container: each replica of
# the worker service gets its own. It survives a restart of the container, not its re-creation.
RUN useradd --create-home --uid 10001 modelfleet \
    && mkdir -p /var/lib/modelfleet \
    && chown modelfleet:modelfleet /var/lib/modelfleet
USER modelfleet
WORKDIR /home/modelfleet

EXPOSE 8000 5555
ENTRYPOINT ["modelfleet"]
CMD ["--help"]
