# The scalecar gateway image: a static-enough release build of the
# `scalecar` binary without the demo (cargo feature), on distroless, as
# non-root with nothing writable. Build from the repository root:
#   docker build -t ghcr.io/scalecar/scalecar:0.1.0 --build-arg SCALECAR_COMMIT=$(git rev-parse --short=12 HEAD) .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
ARG SCALECAR_COMMIT=unknown
ENV SCALECAR_COMMIT=${SCALECAR_COMMIT}
RUN cargo build --release --locked --no-default-features -p scalecar-cli --bin scalecar \
 && install -D -m 0555 target/release/scalecar /out/scalecar

# glibc and CA certificates (the in-cluster API server is HTTPS), no shell.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/scalecar /usr/local/bin/scalecar
# 65532 is distroless's nonroot user; deploy/ runs it with the same uid.
USER 65532:65532
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/scalecar"]
CMD ["run", "--config", "/etc/scalecar/scalecar.yaml"]
