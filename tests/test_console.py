"""A console a person can read: each Flower event once, no line that does not apply, a progress display."""

import io
import subprocess
import sys

from common.config import PROJECT_ROOT
from simulations.console import RoundProgress, RunConsole, not_this_run

FLOWER_END = [
    "\x1b[93mWARNING \x1b[0m:   Since flwr 1.32, default simulated SuperNodes changed from 10 to 2.\n",
    "\x1b[92mINFO \x1b[0m:      Federation `@none/default` (3 simulated SuperNodes)\n",
    "\x1b[92mINFO \x1b[0m:      To change federation size, use the following command:\n",
    "\x1b[92mINFO \x1b[0m:      \tflwr federation simulation-config @none/default <superlink> --num-supernodes <N>\n",
    "\x1b[92mINFO \x1b[0m:      configure_train: Sampled 3 nodes (out of 3)\n",
    "\x1b[92mINFO \x1b[0m:      aggregate_train: Received 3 results and 0 failures\n",
    "[round 1] 3 sites, reconstruction 137.32, kl 4.05, total 141.37 (56.8 s, 12.5 images/s) [hospital_1: ok]\n",
    "\x1b[36m(ClientAppActor pid=7408)\x1b[0m \x1b[93mWARNING \x1b[0m:   Manually terminating ClientAppActor\n",
]


def test_the_console_drops_what_does_not_apply_and_keeps_the_rest_once_and_plain():
    out = io.StringIO()
    console = RunConsole(rounds=2, out=out, bar_stream=io.StringIO())  # not a terminal: plain lines, no bar
    for line in FLOWER_END:
        console.line(line)
    console.close()
    shown = out.getvalue().splitlines()
    assert shown == ["INFO :      Federation `@none/default` (3 simulated SuperNodes)",
                     "INFO :      configure_train: Sampled 3 nodes (out of 3)",
                     "INFO :      aggregate_train: Received 3 results and 0 failures",
                     FLOWER_END[6].rstrip("\n")]
    verbose = io.StringIO()
    everything = RunConsole(rounds=2, verbose=True, out=verbose, bar_stream=io.StringIO())
    for line in FLOWER_END:
        everything.line(line)
    assert verbose.getvalue() == "".join(FLOWER_END)
    assert not_this_run("ERROR : Simulation raised an exception") is None


def test_round_progress_counts_sites_and_reads_the_rounds_figures():
    progress = RoundProgress(rounds=3, first_round=2)  # a resumed run: rounds 2 to 4
    assert not progress.read("configure_train: Sampled 4 nodes (out of 4)")
    assert progress.postfix() == "sites 0/4"
    progress.read("aggregate_train: Received 3 results and 1 failures")
    assert progress.read("[round 2] 3 sites, total 9.5 (4.0 s, 20.0 images/s) [a: ok]")
    assert progress.completed == 1
    assert progress.postfix() == "sites 3/4; last round: images/s 20.0, loss 9.5"


def test_flower_lines_are_printed_once_in_a_process_that_loaded_the_apps():
    """Opacus's import-time logging.basicConfig gave the root logger a handler that printed each Flower record a
    second time, timestamped, DEBUG included, in every process Flower started."""
    code = ("import logging; import server.server_app, client.client_app; from flwr.common.logger import log; "
            "log(logging.INFO, 'one event'); log(logging.DEBUG, 'a debug event')")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(PROJECT_ROOT)})
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-2000:]
    assert output.count("one event") == 1 and "a debug event" not in output, output[-2000:]


FLOWER_FINAL = [
    "INFO :      Global evaluation\n",
    "INFO :      \t└──> MetricRecord: None\n",
    "INFO :      Global evaluation\n",
    "INFO :      \t└──> MetricRecord: {'probe-balanced-accuracy': 0.61}\n",
    "INFO :      \n",
    "INFO :      Strategy execution finished in 234.15s\n",
    "INFO :      \n",
    "INFO :      Final results:\n",
    "INFO :      \n",
    "INFO :      \tGlobal Arrays:\n",
    "INFO :      \t\tArrayRecord (106.147 MB)\n",
    "INFO :      \tAggregated ClientApp-side Train Metrics:\n",
    "INFO :      \t{ 1: { 'epsilon': 'inf',\n",
    "INFO :      \t       'site-index': '1.3068e+00'}}\n",
    "INFO :      \n",
    "federated pretraining finished after round 3: checkpoint /x/checkpoint.pt, history /x/history.json\n",
    "INFO :      Global evaluation\n",
]


def test_flowers_end_of_run_dump_and_empty_evaluations_are_not_shown_but_real_results_are():
    out = io.StringIO()
    console = RunConsole(rounds=3, out=out, bar_stream=io.StringIO())
    for line in FLOWER_FINAL:
        console.line(line)
    console.close()
    assert out.getvalue().splitlines() == [
        "INFO :      Global evaluation",
        "INFO :      \t└──> MetricRecord: {'probe-balanced-accuracy': 0.61}",
        "INFO :      ",
        "INFO :      Strategy execution finished in 234.15s",
        "INFO :      ",
        "federated pretraining finished after round 3: checkpoint /x/checkpoint.pt, history /x/history.json",
        "INFO :      Global evaluation",  # a header the stream ended after is still shown
    ]
