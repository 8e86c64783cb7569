# sluice as a container (ECS Fargate: `sluice watch --queue URL` or `--schedule CRON`).
# docker build -t sluice . && docker run --rm -v "$PWD:/pipeline" sluice --config /pipeline/sluice.toml run
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY benches benches
COPY tests tests
COPY queries queries
COPY schemas schemas
COPY fixtures fixtures
COPY sluice.toml README.md ARCHITECTURE.md ./
RUN cargo build --release --locked --features delta,distributed \
 && strip --strip-debug target/release/sluice

# glibc and libgcc, nothing else; runs as an unprivileged user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/sluice /usr/local/bin/sluice
# The deployed example pipeline (deploy/sluice.toml); mount or bake in your own.
COPY --chown=nonroot:nonroot deploy/sluice.toml /pipeline/sluice.toml
COPY --chown=nonroot:nonroot queries /pipeline/queries
COPY --chown=nonroot:nonroot schemas /pipeline/schemas
WORKDIR /pipeline
USER nonroot
ENTRYPOINT ["sluice"]
CMD ["--config", "/pipeline/sluice.toml", "watch", "--every", "15m"]
