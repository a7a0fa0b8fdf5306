"""Redis instructions per transaction of the velocity scripts: a figure the shared host cannot move.

    python -m bench.script_instructions [--count 20000] [--accounts 5000] [--batch 1000]
                                        [--port 16390] [--start-seconds 60]

Wall-clock and CPU-time figures of Redis swing by half on this project's shared VM from one hour
to the next (README, Benchmarks), which hides changes of a few percent. This counts the
instructions Redis executes instead: it starts a redis-server of its own under valgrind's
callgrind (on `--port`, the local infrastructure's settings), applies the scoring benchmark's
workload (the handbook's customers and terminals, `bench.scoring_bench`) through the velocity
store in batches of `--batch`, and reads callgrind's instruction count (Ir) around the work:

  * account and terminal scripts: the workload as it is;
  * account script alone: the same transactions without their terminals;
  * terminal script: the difference.

The same code and workload give the same count to within ~0.3%, so a change to the scripts or to
their arguments can be measured before and after. Instructions are not time: under contention
Redis's time goes to memory stalls that instructions do not show (README). Needs valgrind
(`apt-get install valgrind`); callgrind runs Redis ~50x slower, so the default count takes about
a minute. The server is stopped and its files removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from pathlib import Path

import redis.asyncio as aioredis

from bench.scoring_bench import _transactions
from protos.fraud.v1 import transaction_pb2
from shared.infra import LOOPBACK, redis_ping
from shared.scoring.features import TxRecord
from shared.scoring.velocity import RECOMMENDED_ZSET_LISTPACK_VALUE, VelocityStore

__all__ = ["main", "measure"]


class _Callgrind:
    """A redis-server under callgrind; `instructions(work)` is the count while `work` runs."""

    def __init__(self, port: int, folder: Path) -> None:
        self.port = port
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float) -> None:
        command = [
            "valgrind", "--tool=callgrind", f"--callgrind-out-file={self.folder}/out.%p",
            "redis-server", "--port", str(self.port), "--bind", LOOPBACK, "--save", "",
            "--appendonly", "no", "--dir", str(self.folder),
            "--zset-max-listpack-value", str(RECOMMENDED_ZSET_LISTPACK_VALUE),
        ]  # fmt: skip
        log = (self.folder / "redis.log").open("wb")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout_s
        while not redis_ping(LOOPBACK, self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server under callgrind did not start:\n{tail}")
            time.sleep(0.2)

    def _control(self, *args: str) -> None:
        assert self.process is not None
        subprocess.run(
            ["callgrind_control", *args, str(self.process.pid)], check=True, capture_output=True
        )

    def zero(self) -> None:
        self._control("--zero")

    def dumped_instructions(self) -> int:
        """Dump the counts since the last zero; return their total."""
        self._control("--dump")
        dumps = sorted(self.folder.glob("out.*"), key=lambda p: p.stat().st_mtime)
        for line in dumps[-1].read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
        raise RuntimeError(f"no instruction total in {dumps[-1]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _count(server: _Callgrind, txs: Sequence[TxRecord], batch: int) -> float:
    """Instructions per transaction of applying `txs` in a fresh namespace."""
    client = aioredis.Redis(host=LOOPBACK, port=server.port)
    store = VelocityStore(client, f"instructions-{uuid.uuid4().hex[:8]}")
    try:
        await store.load_scripts()
        server.zero()
        for start in range(0, len(txs), batch):
            await store.apply_batch(txs[start : start + batch])
        total = server.dumped_instructions()
        await store.clear()
    finally:
        await client.aclose()
    return total / len(txs)


async def measure(
    *, count: int, accounts: int, batch: int, port: int, start_seconds: float
) -> dict[str, float]:
    payloads = _transactions(count, accounts, seed=7)
    txs = [TxRecord.from_proto(transaction_pb2.Transaction.FromString(p)) for p in payloads]
    without_terminals = [dataclasses.replace(tx, terminal_id="") for tx in txs]
    with tempfile.TemporaryDirectory(prefix="fraudstream-callgrind-") as folder:
        server = _Callgrind(port, Path(folder))
        try:
            server.start(start_seconds)
            both = await _count(server, txs, batch)
            account = await _count(server, without_terminals, batch)
        finally:
            server.stop()
    return {"account and terminal": both, "account": account, "terminal": both - account}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.script_instructions",
        description="Redis instructions per transaction of the velocity scripts (callgrind).",
    )
    parser.add_argument("--count", type=int, default=20_000, help="transactions")
    parser.add_argument("--accounts", type=int, default=5000, help="distinct accounts")
    parser.add_argument("--batch", type=int, default=1000, help="transactions per call")
    parser.add_argument("--port", type=int, default=16390, help="the measured server's port")
    parser.add_argument(
        "--start-seconds", type=float, default=60.0, help="how long the server may take to start"
    )
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "redis-server"):
        if shutil.which(tool) is None:
            print(f"script_instructions: {tool} not found (apt-get install valgrind redis-server)")
            return 2
    started = time.monotonic()
    figures = asyncio.run(
        measure(
            count=args.count,
            accounts=args.accounts,
            batch=args.batch,
            port=args.port,
            start_seconds=args.start_seconds,
        )
    )
    print(
        f"velocity scripts: Redis instructions per transaction (callgrind), {args.count:,} "
        f"transactions of {args.accounts:,} accounts, batches of {args.batch:,}"
    )
    for name, value in figures.items():
        print(f"  {name:<22} {value:>10,.0f}")
    print(f"  ({time.monotonic() - started:.0f} s, Redis under callgrind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
