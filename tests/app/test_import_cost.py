"""Import cost: the paths that must start fast import none of torch, Opacus or MONAI.

Each check runs a fresh interpreter and reads ``sys.modules`` at its end, so a slow or a fast
machine gives the same answer (``bench/startup_cost.py`` measures the seconds). torch, Opacus and
MONAI take seconds each to import; ``fedfew --help``, ``fedfew budget verify`` and a ClientApp
process before its first message need none of them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from app.cli import COMMANDS, app, load_command
from privacy.accounting import OPACUS_DEFAULT_ORDERS
from privacy.ledger import Ledger

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "opacus", "monai")
TIMEOUT_S = 240  # a fresh interpreter on a loaded 2-core machine
MARKER = "HEAVY="

# Runs the fedfew entry point with argv[1] (JSON) as its arguments, then prints which heavy
# modules the process imported.
_CLI_PROBE = f"""
import json, sys
args = json.loads(sys.argv[1])
sys.argv = ["fedfew", *args]
from app.cli import main
try:
    main()
except SystemExit as exc:
    code = exc.code
print({MARKER!r} + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)
sys.exit(code)
"""
_CLIENT_APP_PROBE = f"""
import json, sys
import federation.client_app as client_app
assert client_app.app is not None
print({MARKER!r} + json.dumps([m for m in {HEAVY!r} if m in sys.modules]), file=sys.stderr)
"""
# Charges a fresh ledger in a fresh process; while Opacus is being imported, another connection
# tries to take the ledger's write lock without waiting, and the probe prints whether it could.
_CHARGE_PROBE = f"""
import importlib.abc, json, sqlite3, sys
from privacy.ledger import ChargeRequest, Ledger
path = sys.argv[1]
seen = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path_=None, target=None):
        if name == "opacus" and not seen:
            other = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
                seen.append("free")
            except sqlite3.OperationalError:
                seen.append("locked")
            finally:
                other.close()
        return None

sys.meta_path.insert(0, Watch())
Ledger.open(path).charge(ChargeRequest(
    run_id="r", round=0, mechanism="dp-episodic", noise_multiplier=2.0,
    sensitivity_factor=2.0, sample_rate=0.01, steps=10, requester="test",
))
print({MARKER!r} + json.dumps(seen), file=sys.stderr)
"""


def _probe(code: str, *args: str) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    done = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith(MARKER)]
    assert lines, f"probe did not finish: {done.stderr[-2000:]}"
    return done, json.loads(lines[-1].removeprefix(MARKER))


def test_help_lists_every_command_without_importing_torch_opacus_or_monai():
    done, heavy = _probe(_CLI_PROBE, json.dumps(["--help"]))
    assert done.returncode == 0, done.stderr
    assert heavy == []
    listed = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("│ ")}
    assert set(COMMANDS) <= listed
    for lazy in COMMANDS.values():
        assert lazy.help in " ".join(done.stdout.replace("│", " ").split())


def test_budget_verify_does_not_import_torch_opacus_or_monai(tmp_path):
    path = tmp_path / "ledger.db"
    Ledger.create(path, site="a", cap_epsilon=4.0, delta=1e-5, accountant="rdp")
    done, heavy = _probe(_CLI_PROBE, json.dumps(["budget", "verify", "--ledger", str(path)]))
    assert done.returncode == 0, done.stderr
    assert "ledger intact: 0 rows" in done.stdout
    assert heavy == []


def test_client_app_imports_no_training_stack_before_a_message():
    done, heavy = _probe(_CLIENT_APP_PROBE)
    assert done.returncode == 0, done.stderr
    assert heavy == []


def test_first_charge_imports_opacus_before_it_takes_the_ledger_lock(tmp_path):
    # Opacus loads lazily now; imported inside the write transaction, it would hold every other
    # writer of the site's ledger for seconds (past the busy timeout on a loaded machine).
    path = tmp_path / "ledger.db"
    Ledger.create(path, site="a", cap_epsilon=4.0, delta=1e-5, accountant="rdp")
    done, seen = _probe(_CHARGE_PROBE, str(path))
    assert done.returncode == 0, done.stderr
    assert seen == ["free"]


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_listed_help_is_the_first_paragraph_of_the_commands_own(name):
    command = load_command(name)
    own = " ".join((command.help or "").split("\n\n")[0].split())
    assert COMMANDS[name].help == own
    assert bool(COMMANDS[name].group) == hasattr(command, "commands")


def test_every_command_is_registered_on_the_root_app_in_table_order():
    names = [info.name for info in app.registered_commands]
    names += [group.name for group in app.registered_groups]
    assert names == list(COMMANDS)


def test_written_out_rdp_orders_are_opacus_defaults():
    from opacus.accountants import RDPAccountant

    assert tuple(RDPAccountant.DEFAULT_ALPHAS) == OPACUS_DEFAULT_ORDERS
