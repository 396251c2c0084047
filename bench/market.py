"""`make bench` (market part): the market-data engine's own figures.

1. `simulate` throughput, one core: bars per CPU second of every model with every estimator on
   and each bar serialised to JSON Lines, as `agentspoonsd simulate` does, with the GARCH(1,1)
   fit OFF; then the garch model with the fit ON at its defaults (a 500-bar window refitted
   every 100 bars), the figure the README quotes. Each is the best of ``--repeat`` runs (3):
   other processes on a shared machine only ever add CPU time (cache and core contention), so
   the fastest run is the closest to the code's own cost; every run is listed under the table;
2. the generator's per-tick cost with 100 symbols at 1 update/s, as a share of one core
   (measured as process CPU time per tick, worker threads included, over many ticks).

Prints a table and appends it, dated, to bench/RESULTS.md (unless --no-save).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import structlog
import trio

from agentspoonsd import __version__
from agentspoonsd.market.generator import Generator
from agentspoonsd.market.models import MODEL_KINDS
from agentspoonsd.settings import Settings

RESULTS = Path(__file__).with_name("RESULTS.md")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def simulate_rate(model: str, steps: int, *, fit: bool, workdir: Path) -> float:
    """Bars per CPU second of `agentspoonsd simulate` itself (a subprocess writing JSON Lines to
    /dev/null), net of its start-up: the CPU time of a run with ``--steps 0`` is subtracted."""
    config = workdir / f"market-{model}-{fit}.toml"
    config.write_text(
        f'[generator]\nmodel = "{model}"\n[generator.garch_fit]\nenabled = {str(fit).lower()}\n'
    )
    executable = Path(sys.executable).with_name("agentspoonsd")

    def cpu_of(n: int) -> float:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(
            [
                str(executable),
                "simulate",
                "--config",
                str(config),
                "--seed",
                "1",
                "--steps",
                str(n),
                "--output",
                os.devnull,
            ],
            check=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)

    startup = min(cpu_of(0) for _ in range(3))
    return steps / (cpu_of(steps) - startup)


async def tick_cost(symbols: int, ticks: int, interval: float) -> float:
    """CPU seconds per tick of a Generator with `symbols` symbols (fits included)."""
    settings = Settings(
        generator={
            "seed": 1,
            "interval": interval,
            "symbols": [f"SYM{i}/USD" for i in range(symbols)],
        }
    ).generator
    send, receive = trio.open_memory_channel(16)
    generator = Generator(settings.spec(), send, structlog.get_logger("bench"))
    async with trio.open_nursery() as nursery:
        await nursery.start(generator.run)  # returns after the warm-up
        await receive.receive()
        cpu = cpu_seconds()
        for _ in range(ticks):
            await receive.receive()
        cpu = cpu_seconds() - cpu
        nursery.cancel_scope.cancel()
    return cpu / ticks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300_000, help="bars per simulate run")
    parser.add_argument("--ticks", type=int, default=300, help="generator ticks measured")
    parser.add_argument("--repeat", type=int, default=3, help="simulate runs per measure (best)")
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(40))

    rows: list[tuple[str, list[float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in MODEL_KINDS:
            rates = [
                simulate_rate(model, args.steps, fit=False, workdir=Path(tmp))
                for _ in range(args.repeat)
            ]
            rows.append((f"`simulate` {model}: 6 estimators, JSON Lines out, GARCH fit OFF", rates))
        rates = [
            simulate_rate("garch", args.steps, fit=True, workdir=Path(tmp))
            for _ in range(args.repeat)
        ]
        rows.append(
            (
                "`simulate` garch: 6 estimators, JSON Lines out, GARCH fit ON "
                "(default refits: window 500, every 100 bars)",
                rates,
            )
        )
    # Ticks run back to back (interval 1 ms) so hundreds are measured quickly; the cost of a
    # tick does not depend on the interval, and at 1 update/s its share of a core is cost / 1 s.
    per_tick = trio.run(tick_cost, 100, args.ticks, 0.001)

    lines = [
        f"## {datetime.now(UTC):%a %b %d %H:%M:%S UTC %Y} — `bench/market.py`",
        "",
        f"Machine: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, agentspoonsd {__version__}; one process, one core.",
        "",
        f"| Measure (one core, {args.steps:,} bars, best of {args.repeat} runs) "
        "| bars per CPU second |",
        "|---|--:|",
        *(f"| {name} | {max(rates):,.0f} |" for name, rates in rows),
        "",
        *(
            f"- All runs, {name.split(':')[0]}{' fit ON' if 'fit ON' in name else ''}: "
            + ", ".join(f"{rate:,.0f}" for rate in rates)
            for name, rates in rows
        ),
        f"- Generator, 100 symbols (garch, fits on): {per_tick * 1e3:.2f} ms CPU per tick "
        f"= {per_tick * 100:.2f} % of one core at 1 update/s.",
        "",
    ]
    print("\n".join(lines))
    if not args.no_save:
        with RESULTS.open("a") as f:
            f.write("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
