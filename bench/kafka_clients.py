"""Which Python Kafka client the Kafka transport uses: aiokafka or
confluent-kafka (its asyncio ``AIOProducer``/``AIOConsumer``), measured the
way the transport uses a client, against the loopback broker of
scripts/brokers-up.sh.

For each client, on a fresh one-partition topic:

* ``produce``: ``--messages`` records of about 250 bytes, idempotent producer
  (acks=all), sent in batches of ``--batch`` and every batch awaited, as the
  leader's transport driver publishes;
* ``produce-txn``: the same with one transaction per batch (what the
  transport does to fence a deposed leader);
* ``consume``: the records of both phases (2 x ``--messages``) read back
  from the first offset by a manually assigned, read_committed consumer.

Each row gives messages per second and the process CPU per message
(librdkafka's own threads included). Bounded: every phase stops at
``--deadline-s``. Run::

    .venv/bin/python -m bench.kafka_clients --messages 20000 --batch 500

The clients are imported here only, never by the core (the transport plugin
imports the one chosen).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

BOOTSTRAP = "127.0.0.1:9092"


def records(n: int) -> list[tuple[bytes, bytes]]:
    body = {"id": "m", "type": "event", "source": "bench", "priority": 5, "payload": {"text": "x" * 160}}
    return [(f"bench:{i}".encode(), json.dumps({"v": 1, "index": i, "message": body}).encode()) for i in range(n)]


class Phase:
    def __init__(self, name: str, deadline_s: float) -> None:
        self.name = name
        self.deadline_s = deadline_s

    async def run(self, body: Callable[[], Awaitable[int]]) -> tuple[int, float, float]:
        wall, cpu = time.perf_counter(), time.process_time()
        async with asyncio.timeout(self.deadline_s):
            done = await body()
        return done, time.perf_counter() - wall, time.process_time() - cpu


# -- aiokafka ---------------------------------------------------------------------------------------

async def aiokafka_rounds(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    topic = f"bench-aiokafka-{secrets.token_hex(4)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    await admin.create_topics([NewTopic(topic, 1, 1)])
    data = records(args.messages)
    out = []
    try:
        async def produce(transactional: bool) -> int:
            extra: dict[str, Any] = {"transactional_id": f"{topic}-tx"} if transactional else {}
            producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, enable_idempotence=True, acks="all",
                                        linger_ms=0, max_batch_size=1 << 20, retry_backoff_ms=10, **extra)
            await producer.start()
            try:
                for first in range(0, len(data), args.batch):
                    chunk = data[first:first + args.batch]
                    if transactional:
                        await producer.begin_transaction()
                    futures = [await producer.send(topic, value, key=key, partition=0) for key, value in chunk]
                    await asyncio.gather(*futures)
                    if transactional:
                        await producer.commit_transaction()
                return len(data)
            finally:
                await producer.stop()

        async def consume() -> int:
            consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, enable_auto_commit=False,
                                        isolation_level="read_committed", auto_offset_reset="earliest",
                                        max_partition_fetch_bytes=1 << 20)
            await consumer.start()
            try:
                consumer.assign([TopicPartition(topic, 0)])
                got = 0
                while got < 2 * len(data):
                    batch = await consumer.getmany(timeout_ms=500, max_records=1000)
                    n = sum(len(v) for v in batch.values())
                    if not n:
                        break
                    got += n
                return got
            finally:
                await consumer.stop()

        out.append(("produce", *await Phase("produce", args.deadline_s).run(lambda: produce(False))))
        out.append(("produce-txn", *await Phase("produce-txn", args.deadline_s).run(lambda: produce(True))))
        out.append(("consume", *await Phase("consume", args.deadline_s).run(consume)))
    finally:
        await admin.delete_topics([topic])
        await admin.close()
    return out


# -- confluent-kafka --------------------------------------------------------------------------------

async def confluent_rounds(args: argparse.Namespace) -> list[tuple[str, int, float, float]]:
    from confluent_kafka import TopicPartition
    from confluent_kafka.admin import AdminClient, NewTopic
    from confluent_kafka.aio import AIOConsumer, AIOProducer

    topic = f"bench-confluent-{secrets.token_hex(4)}"
    admin = AdminClient({"bootstrap.servers": BOOTSTRAP})
    loop = asyncio.get_running_loop()
    futures = admin.create_topics([NewTopic(topic, 1, 1)])
    await loop.run_in_executor(None, futures[topic].result, 10)
    data = records(args.messages)
    out = []
    try:
        async def produce(transactional: bool) -> int:
            conf: dict[str, Any] = {"bootstrap.servers": BOOTSTRAP, "enable.idempotence": True, "acks": "all",
                                    "linger.ms": 0, "retry.backoff.ms": 10}
            if transactional:
                conf["transactional.id"] = f"{topic}-tx"
            producer = AIOProducer(conf, batch_size=args.batch)
            try:
                if transactional:
                    await producer.init_transactions(10)
                for first in range(0, len(data), args.batch):
                    chunk = data[first:first + args.batch]
                    if transactional:
                        await producer.begin_transaction()
                    futures = [await producer.produce(topic, value, key, partition=0) for key, value in chunk]
                    await producer.flush(10)
                    await asyncio.gather(*futures)
                    if transactional:
                        await producer.commit_transaction(10)
                return len(data)
            finally:
                await producer.close()

        async def consume() -> int:
            consumer = AIOConsumer({"bootstrap.servers": BOOTSTRAP, "group.id": f"{topic}-g",
                                    "enable.auto.commit": False, "isolation.level": "read_committed",
                                    "auto.offset.reset": "earliest"})
            try:
                await consumer.assign([TopicPartition(topic, 0, 0)])
                got = 0
                while got < 2 * len(data):
                    batch = await consumer.consume(1000, 0.5)
                    batch = [m for m in batch if m.error() is None]
                    if not batch:
                        break
                    got += len(batch)
                return got
            finally:
                await consumer.close()

        out.append(("produce", *await Phase("produce", args.deadline_s).run(lambda: produce(False))))
        out.append(("produce-txn", *await Phase("produce-txn", args.deadline_s).run(lambda: produce(True))))
        out.append(("consume", *await Phase("consume", args.deadline_s).run(consume)))
    finally:
        futures = admin.delete_topics([topic])
        await loop.run_in_executor(None, futures[topic].result, 10)
    return out


async def main(args: argparse.Namespace) -> None:
    print(f"{args.messages} messages, batches of {args.batch}, broker {BOOTSTRAP}")
    print(f"{'client':<16} {'phase':<12} {'msgs':>7} {'msgs/s':>9} {'cpu us/msg':>10}")
    for name, rounds in (("aiokafka", aiokafka_rounds), ("confluent-kafka", confluent_rounds)):
        for _ in range(args.repeat):
            for phase, done, wall_s, cpu_s in await rounds(args):
                print(f"{name:<16} {phase:<12} {done:>7} {done / wall_s:>9.0f} {cpu_s / max(done, 1) * 1e6:>10.1f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--deadline-s", type=float, default=120.0)
    asyncio.run(main(parser.parse_args()))
