# keybroker container image: a static (musl) build with the pinned Rust
# toolchain, in an image holding only the binary and the CA certificates,
# run as a non-root user. tests/helm/check_chart.py checks that the
# entrypoint, user, ports and paths agree with the Helm chart.
#   docker build -t keybroker:0.1.0 .

FROM docker.io/library/rust:1.95.0-alpine3.22 AS build
RUN apk add --no-cache build-base cmake perl ca-certificates
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p keybroker-server --bin keybroker \
 && install -D -m 0755 target/release/keybroker /out/keybroker

FROM scratch
COPY --from=build /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=build /out/keybroker /usr/local/bin/keybroker
USER 65532:65532
# gRPC (mTLS), plain-text gRPC health, Prometheus metrics.
EXPOSE 50051 8086 9464
ENV KEYBROKER_CONFIG=/etc/keybroker/config/keybroker.toml
ENTRYPOINT ["/usr/local/bin/keybroker"]
CMD ["serve", "--config", "/etc/keybroker/config/keybroker.toml"]
