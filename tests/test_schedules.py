import pytest
import torch

from autolr.schedules import (
    SCHEDULES,
    cyclic,
    has_momentum,
    make_scheduler,
    one_cycle,
    step_decay,
)


def sgd(momentum: float = 0.9) -> torch.optim.SGD:
    return torch.optim.SGD(torch.nn.Linear(3, 2).parameters(), lr=0.1, momentum=momentum)


def adamw() -> torch.optim.AdamW:
    return torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1e-3)


def trace(optimizer, scheduler, steps: int) -> tuple[list[float], list[float]]:
    """LR and momentum (or beta1) used at each of ``steps`` optimizer steps."""
    lrs, momenta = [], []
    for _ in range(steps):
        group = optimizer.param_groups[0]
        lrs.append(group["lr"])
        momenta.append(group["betas"][0] if "betas" in group else group["momentum"])
        optimizer.step()
        scheduler.step()
    return lrs, momenta


def test_one_cycle_starts_at_min_lr_and_peaks_at_max_lr_at_pct_start():
    opt = sgd()
    lrs, _ = trace(opt, one_cycle(opt, max_lr=1.0, min_lr=0.04, total_steps=100), 100)
    assert lrs[0] == pytest.approx(0.04)
    assert max(lrs) == pytest.approx(1.0)
    assert lrs.index(max(lrs)) == 29  # the 30th of 100 steps: pct_start=0.3
    assert lrs[-1] < 0.04 / 1000  # anneals far below min_lr (final_div_factor=1e4)


def test_one_cycle_cycles_sgd_momentum_inversely_to_the_lr():
    opt = sgd()
    lrs, momenta = trace(opt, one_cycle(opt, max_lr=1.0, min_lr=0.04, total_steps=100), 100)
    peak = lrs.index(max(lrs))
    assert momenta[0] == pytest.approx(0.95)
    assert momenta[peak] == pytest.approx(0.85)
    assert momenta[-1] == pytest.approx(0.95, abs=1e-3)


def test_one_cycle_cycles_beta1_for_adamw_and_keeps_beta2():
    opt = adamw()
    lrs, beta1 = trace(opt, one_cycle(opt, max_lr=0.01, min_lr=0.001, total_steps=50), 50)
    assert beta1[0] == pytest.approx(0.95)
    assert beta1[lrs.index(max(lrs))] == pytest.approx(0.85)
    assert opt.param_groups[0]["betas"][1] == pytest.approx(0.999)


def test_one_cycle_leaves_sgd_without_momentum_alone():
    opt = sgd(momentum=0.0)
    assert not has_momentum(opt)
    _, momenta = trace(opt, one_cycle(opt, max_lr=1.0, min_lr=0.1, total_steps=20), 20)
    assert momenta == [0.0] * 20


def test_one_cycle_accepts_an_optimizer_with_neither_momentum_nor_betas():
    opt = torch.optim.Adagrad(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    scheduler = one_cycle(opt, max_lr=1.0, min_lr=0.1, total_steps=10)
    assert not scheduler.cycle_momentum
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)


def test_three_phase_cycle_returns_to_min_lr_before_annealing_further():
    opt = sgd()
    lrs, _ = trace(
        opt, one_cycle(opt, max_lr=1.0, min_lr=0.04, total_steps=100, three_phase=True), 100
    )
    assert lrs.index(max(lrs)) == 29
    assert lrs[58] == pytest.approx(0.04)  # end of the symmetric second phase
    assert lrs[-1] < 0.04 / 1000


def test_onecycle3_by_name_is_the_three_phase_cycle():
    by_name, direct = sgd(), sgd()
    kwargs = {"max_lr": 1.0, "min_lr": 0.04, "total_steps": 100}
    lrs, _ = trace(by_name, make_scheduler("onecycle3", by_name, **kwargs), 100)
    expected, _ = trace(direct, one_cycle(direct, three_phase=True, **kwargs), 100)
    assert lrs == expected
    assert lrs[58] == pytest.approx(0.04)


@pytest.mark.parametrize("mode", ["triangular", "triangular2", "exp_range"])
def test_clr_modes_by_name_cycle_between_min_and_max_lr(mode):
    opt = sgd()
    scheduler = make_scheduler(mode, opt, max_lr=1.0, min_lr=0.1, total_steps=80)
    lrs, _ = trace(opt, scheduler, 81)
    assert scheduler.mode == mode
    assert lrs[0] == pytest.approx(0.1)
    assert lrs[20] == pytest.approx(1.0 if mode != "exp_range" else 0.1 + 0.9 * 0.1 ** (20 / 80))
    assert lrs[40] == pytest.approx(0.1)  # two cycles by default: the run ends where it began
    assert lrs[80] == pytest.approx(0.1)
    second_peak = {"triangular": 1.0, "triangular2": 0.55, "exp_range": 0.1 + 0.9 * 0.1**0.75}
    assert lrs[60] == pytest.approx(second_peak[mode])


def test_cyclic_cycles_momentum_inversely():
    opt = sgd()
    _, momenta = trace(opt, cyclic(opt, base_lr=0.1, max_lr=1.0, step_size_up=10), 21)
    assert momenta[0] == pytest.approx(0.95)
    assert momenta[10] == pytest.approx(0.85)
    assert momenta[20] == pytest.approx(0.95)


def test_unknown_schedule_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match="onecycle3") as info:
        make_scheduler("cosine", sgd(), max_lr=1.0, min_lr=0.1, total_steps=10)
    assert all(name in str(info.value) for name in SCHEDULES)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_lr": 0.1, "min_lr": 0.1, "total_steps": 10}, "min_lr < max_lr"),
        ({"max_lr": 0.1, "min_lr": 0.0, "total_steps": 10}, "0 < min_lr"),
        ({"max_lr": float("inf"), "min_lr": 0.1, "total_steps": 10}, "max_lr=inf"),
        ({"max_lr": 1.0, "min_lr": 0.1, "total_steps": 0}, "total_steps must be an int >= 1"),
        ({"max_lr": 1.0, "min_lr": 0.1, "total_steps": 10, "pct_start": 1.0}, "pct_start"),
        ({"max_lr": 1.0, "min_lr": 0.1, "total_steps": 10, "anneal": "exp"}, "anneal"),
    ],
)
def test_one_cycle_rejects_bad_values_with_a_message_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scheduler("onecycle", sgd(), **kwargs)


def test_cyclic_rejects_bad_mode_and_gamma():
    with pytest.raises(ValueError, match="mode must be one of"):
        cyclic(sgd(), base_lr=0.1, max_lr=1.0, step_size_up=5, mode="sine")
    with pytest.raises(ValueError, match="gamma must be in"):
        cyclic(sgd(), base_lr=0.1, max_lr=1.0, step_size_up=5, gamma=1.5)
    with pytest.raises(ValueError, match="cycles must be an int >= 1"):
        make_scheduler("triangular", sgd(), max_lr=1.0, min_lr=0.1, total_steps=10, cycles=0)


def test_step_schedule_holds_max_lr_and_divides_it_by_ten_at_half_and_three_quarters():
    opt = sgd()  # built at lr=0.1: the step schedule sets its own starting LR
    lrs, _ = trace(opt, make_scheduler("step", opt, max_lr=0.2, min_lr=1e-3, total_steps=100), 100)
    assert lrs[0] == lrs[49] == pytest.approx(0.2)
    assert lrs[50] == lrs[74] == pytest.approx(0.02)
    assert lrs[75] == lrs[99] == pytest.approx(0.002)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"milestones": (0.5, 1.0)}, "milestones must be fractions"),
        ({"gamma": 1.0}, "gamma must be in"),
    ],
)
def test_step_schedule_rejects_bad_values_with_a_message_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        step_decay(sgd(), **{"lr": 0.1, "total_steps": 10, **kwargs})
