# syntax=docker/dockerfile:1
#
# One image, both services. The default entrypoint is the gateway; run the dispatcher with
#   docker run --entrypoint /usr/local/bin/herald-dispatcher IMAGE
# or, in Kubernetes, `command: ["/usr/local/bin/herald-dispatcher"]` (see k8s/base).
#
# Build (BuildKit, the default since Docker 23):  docker build -t herald:dev .

# Bookworm on purpose: the binaries link glibc dynamically, so the builder's glibc must not be
# newer than the runtime's (distroless cc-debian12 is bookworm).
FROM rust:1.95-slim-bookworm AS builder
# jemalloc (the services' allocator, built from source by tikv-jemalloc-sys) needs make, which
# the slim image lacks. Pinned to bookworm's version.
RUN apt-get update \
    && apt-get install -y --no-install-recommends make=4.3-4.1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# The cache mounts keep the crates.io index, downloaded crates and compiled dependencies between
# builds, so a source-only change recompiles only Herald's own crates. target/ lives in a cache
# mount, which is not part of the image: the binaries are copied out of it within this same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin herald-gateway --bin herald-dispatcher \
    && mkdir -p /out \
    && cp target/release/herald-gateway target/release/herald-dispatcher /out/

# cc-debian12 carries glibc, libgcc and CA certificates and nothing else: no shell, no package
# manager. The :nonroot tag runs as uid/gid 65532, which k8s/base pins as well.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/herald-gateway /out/herald-dispatcher /usr/local/bin/
USER 65532:65532
# Public ports: the gateway's WebSockets on 8080, the dispatcher's publish and query API on 8090.
# Internal ports (probes, metrics, the dispatcher's operator API): 8180 and 8190.
EXPOSE 8080 8090 8180 8190
ENV HERALD_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/herald-gateway"]
