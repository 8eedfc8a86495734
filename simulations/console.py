"""What `dermfed simulate` shows of `flwr run --stream`: each line once, none that does not apply, a progress display.

The duplicated lines are fixed where they came from (`common.console_logging`) and Ray's FutureWarning is
silenced where it is raised (`simulations.processes.simulation_environment`). What is left here are lines Flower
prints whatever the run, which say nothing true of a `dermfed simulate` run (`NOT_THIS_RUN`, each with why),
Flower's end-of-run "Final results" dump (every round's example-weighted means again, `site-index` and
`epsilon` included; DermFed's round lines and history say them per site), a "Global evaluation" header with no
result (no monitor ran), and the progress display: on a terminal a tqdm bar over the rounds (sites done, images/s, loss) below the lines;
elsewhere (a CI log) the plain lines alone, ANSI colours removed, the ServerApp's `[round N]` line being the
round's progress line. `verbose` (`dermfed simulate -v`) passes every line through unchanged.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from typing import IO, Iterable, Optional

NOT_THIS_RUN: tuple[tuple[str, str], ...] = (
    ("Since flwr 1.32, default simulated SuperNodes changed",
     "Flower warns of its default federation size at every simulation; dermfed simulate sets it to the hospitals"),
    ("To change federation size, use the following command",
     "the same: the hospitals are the data's partitions (data.partition), not a Flower setting"),
    ("flwr federation simulation-config", "the command that goes with the line above"),
    ("Manually terminating ClientAppActor", "Flower stopping its own actors at the normal end of every simulation"),
)
FINAL_RESULTS = "Final results:"  # Flower's end-of-run dump: every round's example-weighted means again, one per line
FLOWER_BLOCK_LINE = re.compile(r"^(INFO|DEBUG)\s*:\s*(\t.*)?$")  # a line of that dump (tab-indented) or a blank one
NOTHING_EVALUATED = ("Global evaluation", "MetricRecord: None")  # a header and its empty result: no monitor ran
ANSI = re.compile(r"\x1b\[[0-9;]*m")
SAMPLED = re.compile(r"configure_train: Sampled (\d+) nodes")
RECEIVED = re.compile(r"aggregate_train: Received (\d+) results and (\d+) failures")
ROUND_LINE = re.compile(r"^\[round (\d+)\] (\d+) sites, (.*)$")
LOSS = re.compile(r"\btotal (-?[\d.]+(?:e[-+]?\d+)?)")
SPEED = re.compile(r"([\d.]+) images/s")


def not_this_run(line: str) -> Optional[str]:
    """Why `line` says nothing of this run, or None if it should be shown."""
    return next((why for text, why in NOT_THIS_RUN if text in line), None)


@dataclass
class RoundProgress:
    """The current round as the stream tells it: sites asked, sites done, and the last round's figures."""

    rounds: int
    first_round: int = 1
    asked: int = 0
    done: int = 0
    completed: int = 0
    figures: dict[str, str] = field(default_factory=dict)

    def read(self, line: str) -> bool:
        """Update from one plain line; True when a round has completed."""
        if match := SAMPLED.search(line):
            self.asked, self.done = int(match.group(1)), 0
        elif match := RECEIVED.search(line):
            self.done = int(match.group(1))
        elif match := ROUND_LINE.match(line):
            self.completed = int(match.group(1)) - self.first_round + 1
            self.figures = {"sites": match.group(2)}
            if speed := SPEED.search(match.group(3)):
                self.figures["images/s"] = speed.group(1)
            if loss := LOSS.search(match.group(3)):
                self.figures["loss"] = loss.group(1)
            return True
        return False

    def postfix(self) -> str:
        sites = f"sites {self.done}/{self.asked}" if self.asked else ""
        last = ", ".join(f"{k} {v}" for k, v in self.figures.items() if k != "sites")
        return "; ".join(part for part in (sites, f"last round: {last}" if last else "") if part)


class RunConsole:
    """Writes the lines of `flwr run --stream` for a person: `line` for each, `close` at the end."""

    def __init__(self, rounds: int, first_round: int = 1, verbose: bool = False, out: IO[str] = sys.stdout,
                 bar_stream: IO[str] = sys.stderr):
        self.verbose, self.out = verbose, out
        self.progress = RoundProgress(rounds, first_round)
        self.in_final_results = False  # inside Flower's end-of-run dump (DermFed's history and last line say it)
        self.held: Optional[str] = None  # a "Global evaluation" header, shown only if a result follows it
        self.plain = not _is_terminal(out)
        self.bar = None
        if not verbose and _is_terminal(bar_stream):
            from tqdm import tqdm

            self.bar = tqdm(total=rounds, desc="rounds", unit="round", file=bar_stream, leave=True,
                            dynamic_ncols=True, disable=None)

    def line(self, raw: str) -> None:
        text = raw.rstrip("\n")
        if self.verbose:
            self._write(text)
            return
        plain = ANSI.sub("", text)
        if not_this_run(plain) or self._in_final_results(plain):
            return
        if self.held is not None:
            held, self.held = self.held, None
            if NOTHING_EVALUATED[1] in plain:
                return
            self._write(held)
        if plain.rstrip().endswith(NOTHING_EVALUATED[0]):
            self.held = plain if self.plain else text
            return
        self._write(plain if self.plain else text)
        if self.progress.read(plain) and self.bar is not None:
            self.bar.n = min(self.progress.completed, self.bar.total)
        if self.bar is not None:
            self.bar.set_postfix_str(self.progress.postfix(), refresh=True)

    def _in_final_results(self, plain: str) -> bool:
        if FINAL_RESULTS in plain:
            self.in_final_results = True
        elif self.in_final_results and not FLOWER_BLOCK_LINE.match(plain):
            self.in_final_results = False
        return self.in_final_results

    def _write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def close(self) -> None:
        if self.held is not None:
            self._write(self.held)
            self.held = None
        if self.bar is not None:
            self.bar.close()


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def show(lines: Iterable[str], console: RunConsole) -> None:
    """Feed a process's output to the console until it ends (a reader thread's loop)."""
    try:
        for raw in lines:
            console.line(raw)
    finally:
        console.close()
