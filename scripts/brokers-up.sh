#!/usr/bin/env bash
# Make sure the brokers the transport tests use answer on 127.0.0.1:
# Redis 6379, RabbitMQ 5672 (guest/guest), NATS with JetStream 4222, Kafka 9092.
# A broker already answering is left alone. A missing one is installed from
# Debian's packages (redis-server, rabbitmq-server, nats-server) when it is not
# installed yet, then started in the background; its PID is recorded under
# .brokers/ so scripts/brokers-down.sh stops only what this script started.
# Kafka is Apache Kafka's own jars from Maven Central (scripts/kafka/pom.xml,
# fetched once into .brokers/kafka/libs), a single KRaft node (broker and
# controller, 127.0.0.1:9092 and :9093) with its data in .brokers/kafka/data.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.brokers"
mkdir -p "$STATE"

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port, name, seconds
    local deadline=$((SECONDS + $3))
    until up "$1"; do
        if [ "$SECONDS" -ge "$deadline" ]; then
            echo "brokers-up: $2 did not open 127.0.0.1:$1 within $3 s" >&2
            return 1
        fi
        sleep 0.5
    done
}

ensure_package() {  # command, package
    command -v "$1" >/dev/null 2>&1 && return 0
    [ -x "/usr/sbin/$1" ] && return 0
    echo "brokers-up: installing $2 from Debian's packages" >&2
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$2" >&2
}

if ! up 6379; then
    ensure_package redis-server redis-server
    redis-server --bind 127.0.0.1 --port 6379 --save '' --appendonly no --daemonize yes \
        --pidfile "$STATE/redis.pid" --logfile "$STATE/redis.log"
    wait_port 6379 redis 30
fi

if ! up 4222; then
    ensure_package nats-server nats-server
    mkdir -p "$STATE/nats"
    PATH="$PATH:/usr/sbin" nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "$STATE/nats" \
        >"$STATE/nats.log" 2>&1 &
    echo $! > "$STATE/nats.pid"
    wait_port 4222 nats-server 30
fi

if ! up 5672; then
    ensure_package rabbitmq-server rabbitmq-server
    # The Debian package starts its own service on install; start it only if it did not.
    if ! up 5672; then
        PATH="$PATH:/usr/sbin" RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 nohup rabbitmq-server \
            >"$STATE/rabbitmq.log" 2>&1 &
        echo $! > "$STATE/rabbitmq.pid"
    fi
    wait_port 5672 rabbitmq-server 120
fi
KAFKA="$STATE/kafka"
kafka_jars() {  # Maven Central, the ordinary way; skipped once the jars are there
    [ -f "$KAFKA/libs/.complete" ] && return 0
    command -v mvn >/dev/null 2>&1 || ensure_package mvn maven
    command -v java >/dev/null 2>&1 || ensure_package java default-jre-headless
    echo "brokers-up: fetching Apache Kafka's jars from Maven Central" >&2
    rm -rf "$KAFKA/libs"
    if ! mvn -q -B -Dstyle.color=never -f "$ROOT/scripts/kafka/pom.xml" dependency:copy-dependencies \
            -DincludeScope=runtime -DoutputDirectory="$KAFKA/libs" >"$STATE/kafka-fetch.log" 2>&1; then
        cat "$STATE/kafka-fetch.log" >&2
        echo "brokers-up: fetching Kafka's jars failed" >&2
        exit 1
    fi
    touch "$KAFKA/libs/.complete"
}

# The jars also serve tests/transports/test_kafka.py, whose restart test runs
# its own Kafka: fetched even when another checkout's Kafka answers on 9092.
mkdir -p "$KAFKA"
kafka_jars
if ! up 9092; then
    # The properties are written anew each time (the template may change); the
    # storage is formatted once, with a fresh cluster id.
    sed -e "s|@PORT@|9092|g; s|@CONTROLLER_PORT@|9093|g; s|@DATA@|$KAFKA/data|g" \
        "$ROOT/scripts/kafka/server.properties.in" > "$KAFKA/server.properties"
    if [ ! -f "$KAFKA/data/meta.properties" ]; then
        cluster_id="$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
        java -Xmx256m -cp "$KAFKA/libs/*" kafka.tools.StorageTool format -t "$cluster_id" \
            -c "$KAFKA/server.properties" >"$STATE/kafka-format.log" 2>&1 \
            || { tail -20 "$STATE/kafka-format.log" >&2; echo "brokers-up: formatting Kafka's storage failed" >&2; exit 1; }
    fi
    nohup java -Xms128m -Xmx512m -XX:+UseSerialGC -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
        -Dorg.slf4j.simpleLogger.defaultLogLevel=warn -Dorg.slf4j.simpleLogger.log.kafka.server.KafkaRaftServer=info \
        -cp "$KAFKA/libs/*" kafka.Kafka "$KAFKA/server.properties" >"$STATE/kafka.log" 2>&1 &
    echo $! > "$STATE/kafka.pid"
    wait_port 9092 kafka 60
    # The port opens before the broker serves requests: wait for its own word.
    deadline=$((SECONDS + 60))
    until grep -q "Kafka Server started" "$STATE/kafka.log"; do
        if [ "$SECONDS" -ge "$deadline" ] || ! kill -0 "$(cat "$STATE/kafka.pid")" 2>/dev/null; then
            echo "brokers-up: kafka did not start within 60 s (see .brokers/kafka.log)" >&2
            exit 1
        fi
        sleep 0.2
    done
fi
echo "brokers: redis 127.0.0.1:6379, rabbitmq 127.0.0.1:5672, nats 127.0.0.1:4222, kafka 127.0.0.1:9092" >&2
