"""A ledger's budget (privacy/budget_report.py ``budget_of``): spent and remaining from its rows, as
the budget report and `fedfew budget show` print them."""

import pytest

from privacy.accounting import epsilon_for
from privacy.budget_report import budget_of
from privacy.errors import BudgetExhaustedError
from privacy.ledger import Ledger

DELTA = 1e-5


def test_the_budget_counts_charges_and_refusals_and_the_remaining_epsilon(tmp_path, charge_request):
    one = epsilon_for([(1.0, 0.1, 10)], delta=DELTA, accountant="rdp")
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=one * 1.5, delta=DELTA)
    ledger.charge(charge_request(steps=10))
    with pytest.raises(BudgetExhaustedError):
        ledger.charge(charge_request(steps=1000))
    budget = budget_of(ledger)
    assert (budget.charges, budget.refusals) == (1, 1)
    assert budget.spent == pytest.approx(one)
    assert budget.remaining == pytest.approx(one * 0.5)
    assert budget_of(ledger, ledger.entries()) == budget


def test_the_remaining_budget_is_never_negative(tmp_path):
    ledger = Ledger.create(tmp_path / "l.db", site="a", cap_epsilon=1.0, delta=DELTA)
    budget = budget_of(ledger)
    assert budget.remaining == 1.0 and budget.spent == 0.0
    assert type(budget)(cap=1.0, spent=1.5, charges=1, refusals=0).remaining == 0.0
