"""QEMU's own QMP library (qemu.qmp's QMPClient) drives two emus through a live migration.

    qemu_qmp_check.py SRC_SOCKET DST_SOCKET MIGRATION_URI

SRC runs a guest; DST was started with `--incoming defer`. The check connects to both (greeting and
capabilities negotiation are the library's), sets a parameter on the destination before it listens,
starts the migration, and waits for the MIGRATION events with status "completed" on both sides (no
polling). It prints one JSON line of what it saw and exits non-zero, with the reason, on anything
unexpected. Written against qemu.qmp's documented API only: it is the outside check.
"""

import asyncio
import json
import sys

from qemu.qmp import QMPClient

TIMEOUT = 60


async def wait_status(listener, wanted, seen):
    async for event in listener:
        status = event["data"]["status"]
        seen.append(status)
        if status == wanted:
            return
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}, events so far: {seen}")


async def main(src_sock, dst_sock, uri):
    src, dst = QMPClient("emu-source"), QMPClient("emu-destination")
    await asyncio.wait_for(src.connect(src_sock), TIMEOUT)
    await asyncio.wait_for(dst.connect(dst_sock), TIMEOUT)
    greeting = src.greeting._raw["QMP"]["version"]
    status = await src.execute("query-status")
    assert status == {"status": "running", "running": True}, status
    dst_status = await dst.execute("query-status")
    assert dst_status["status"] == "inmigrate", dst_status

    await dst.execute("migrate-set-parameters", {"downtime-limit": 200})
    await dst.execute("migrate-incoming", {"uri": uri})
    src_seen, dst_seen = [], []
    with src.listener("MIGRATION") as src_events, dst.listener("MIGRATION") as dst_events:
        await src.execute("migrate", {"uri": uri})
        await asyncio.wait_for(wait_status(src_events, "completed", src_seen), TIMEOUT)
        await asyncio.wait_for(wait_status(dst_events, "completed", dst_seen), TIMEOUT)

    after = {
        "source": (await src.execute("query-status"))["status"],
        "destination": (await dst.execute("query-status"))["status"],
    }
    info = await src.execute("query-migrate")
    text = await src.execute("human-monitor-command", {"command-line": "info migrate"})
    await src.disconnect()
    await dst.disconnect()
    print(json.dumps({
        "version": greeting,
        "source-events": src_seen,
        "destination-events": dst_seen,
        "status-after": after,
        "query-migrate-status": info["status"],
        "info-migrate-first-line": text.splitlines()[0],
    }))


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    asyncio.run(main(*sys.argv[1:]))
