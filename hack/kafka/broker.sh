#!/usr/bin/env bash
# Runs a single-node Kafka broker (KRaft: broker and controller in one JVM) in the foreground.
#
#   bash hack/kafka/broker.sh DIR [PORT [CONTROLLER_PORT]]
#
# DIR holds everything the broker writes: server.properties, data/ (the log), logs/.
# PORT (clients, PLAINTEXT on 127.0.0.1) and CONTROLLER_PORT default to free ports; the
# chosen ones are written to DIR/ports ("PORT CONTROLLER_PORT") before the JVM starts.
# The storage is formatted on first start and reused after (same DIR, same cluster id).
# The JVM replaces this shell (exec), so signalling the script's pid stops the broker;
# SIGTERM shuts it down cleanly in a second or two.
#
# Environment:
#   KAFKA_HEAP_OPTS    JVM heap (default -Xms64m -Xmx256m: plenty for a test broker)
#   KAFKA_NUM_PARTITIONS  partitions of auto-created topics (default 3, so keys matter)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
die() { printf '[kafka-broker] error: %s\n' "$*" >&2; exit 1; }

[[ $# -ge 1 ]] || die "usage: broker.sh DIR [PORT [CONTROLLER_PORT]]"
dir=$(mkdir -p "$1" && cd "$1" && pwd)
free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}
port=${2:-$(free_port)}
controller_port=${3:-$(free_port)}
for p in "$port" "$controller_port"; do
    [[ "$p" =~ ^[0-9]+$ && "$p" -ge 1 && "$p" -le 65535 ]] || die "port must be a number in 1..65535, got '$p'"
done
[[ "$port" != "$controller_port" ]] || die "PORT and CONTROLLER_PORT must differ"

libs=$(bash "$here/fetch.sh")
mkdir -p "$dir/data" "$dir/logs"
echo "$port $controller_port" >"$dir/ports"

cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller_port
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$controller_port
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$dir/data
num.partitions=${KAFKA_NUM_PARTITIONS:-3}
auto.create.topics.enable=true
# One node: every internal topic has a single replica.
offsets.topic.replication.factor=1
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
# Tests start consumers right away; the default 3 s wait for more group members is dead time.
group.initial.rebalance.delay.ms=0
PROPS

java_opts=(
    ${KAFKA_HEAP_OPTS:--Xms64m -Xmx256m}
    -XX:+UseSerialGC  # one small heap: the parallel collectors' threads only cost memory here
    -Djava.awt.headless=true
    -Dlog4j2.configurationFile="$here/log4j2.properties"
    -Dkafka.logs.dir="$dir/logs"
    -cp "$libs/*"
)

if [[ ! -f "$dir/data/meta.properties" ]]; then
    # A cluster id is 16 random bytes in URL-safe base64 without padding (22 characters).
    cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | cut -c1-22)
    java "${java_opts[@]}" kafka.tools.StorageTool format \
        --cluster-id "$cluster_id" --config "$dir/server.properties" --ignore-formatted >&2 ||
        die "formatting the storage in $dir/data failed (see above)"
fi

exec java "${java_opts[@]}" kafka.Kafka "$dir/server.properties"
