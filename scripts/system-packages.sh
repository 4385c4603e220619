#!/usr/bin/env bash
# Debian packages the tests and benchmarks use: mosquitto (reference broker),
# mosquitto-clients (an outside MQTT client), openssl (an outside CRL producer),
# softhsm2 (a PKCS#11 token for the firmware release keys),
# nftables + iproute2 (the zone ruleset tested in network namespaces: nft, ip netns),
# redis-server (the scale-out tests start private ones to kill; the shared Redis and
# PostgreSQL on loopback are started by the machine, see tests/support/stores.py),
# prometheus (for promtool: checks /metrics and the shipped alert rules),
# gcc + libssl-dev (the benchmarks build their C connection client, benchmarks/connload.c).
set -euo pipefail
missing=()
for cmd in mosquitto mosquitto_pub mosquitto_sub openssl softhsm2-util nft ip redis-server promtool gcc; do
  command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
[ -f /usr/include/openssl/ssl.h ] || missing+=("openssl/ssl.h")
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
  mosquitto mosquitto-clients openssl softhsm2 nftables iproute2 redis-server prometheus gcc libssl-dev >/dev/null
# the reference broker is started by the benchmark itself, never as a system service
$SUDO systemctl disable --now mosquitto >/dev/null 2>&1 || true
# only promtool is wanted from prometheus: never a running Prometheus server
$SUDO systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
