"""Which algorithm pieces go together: checked when a trainer is built, before any model loads.

Each rule reads the registry metadata the entries declare, so a new entry states its own
needs instead of growing an if/elif on names here.
"""
from __future__ import annotations

from rlhf.algos.advantages import ADVANTAGES
from rlhf.algos.aggregate import LOSS_AGGREGATIONS
from rlhf.algos.is_correction import IS_CORRECTIONS
from rlhf.algos.kl import KL_ESTIMATORS
from rlhf.algos.policy_loss import POLICY_LOSSES
from rlhf.algos.updates import UPDATES
from rlhf.config import Config, ConfigError


def critic_type(cfg: Config) -> str:
    """'separate', 'shared' or 'none': `critic.type`, with 'auto' = separate when `algo.advantage` needs values."""
    if cfg.critic.type != "auto":
        return cfg.critic.type
    return "separate" if ADVANTAGES.meta(cfg.algo.advantage).get("needs_values") else "none"


def old_logp_source(cfg: Config) -> str:
    """Where the update's log pi_old comes from, decided once per run:

    - 'forward': a no-grad pass before the update: the KL in the reward, the adaptive KL controller and the
      distillation reward read it before any update, and with several mini-batches a pass's later mini-batches
      come after an optimizer step;
    - 'first_pass': recorded by the update's first pass (no optimizer step before it, one forward saved): several
      passes over one mini-batch, or an update rule that reads it (the natural step's line search);
    - 'none': one pass, one step: pi_old = pi (the loss uses log pi detached, a ratio of 1).
    """
    a, t = cfg.algo, cfg.train
    if a.kl.placement == "in_reward" or t.mini_batches_per_pass > 1 or a.kl.target is not None or cfg.distill.teacher:
        return "forward"
    if t.updates_per_batch > 1 or UPDATES.meta(a.update).get("needs_old_logp"):
        return "first_pass"
    return "none"


def check_names(cfg: Config) -> None:
    """Every algorithm name in `cfg` is registered; a ConfigError names the key and lists the valid names."""
    for key, reg, name in (
        ("algo.advantage", ADVANTAGES, cfg.algo.advantage), ("algo.policy_loss", POLICY_LOSSES, cfg.algo.policy_loss),
        ("algo.loss_agg", LOSS_AGGREGATIONS, cfg.algo.loss_agg),
        ("algo.kl.estimator", KL_ESTIMATORS, cfg.algo.kl.estimator),
        ("algo.is_correction", IS_CORRECTIONS, cfg.algo.is_correction), ("algo.update", UPDATES, cfg.algo.update),
    ):
        try:
            reg.get(name)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None


def check_combination(cfg: Config, has_critic: bool = False) -> None:
    """Raise ConfigError naming the keys of the first invalid combination in `cfg` (names checked: `check_names`)."""
    a, t = cfg.algo, cfg.train
    adv, loss, upd = ADVANTAGES.meta(a.advantage), POLICY_LOSSES.meta(a.policy_loss), UPDATES.meta(a.update)
    if has_critic and not adv.get("needs_values"):
        raise ConfigError(f"critic.type={cfg.critic.type} builds a critic, "
                          f"but algo.advantage={a.advantage} uses no values "
                          f"(use td, nstep_td or gae, or critic.type=auto)")
    if adv.get("needs_values") and not has_critic:
        raise ConfigError(f"algo.advantage={a.advantage} needs a critic (values); "
                          f"set critic.type (auto, separate or shared) or use a critic-free estimator ("
                          f"{', '.join(n for n in ADVANTAGES.names() if not ADVANTAGES.meta(n).get('needs_values'))})")
    if loss.get("on_policy") and t.updates_per_batch * t.mini_batches_per_pass > 1:
        raise ConfigError(f"algo.policy_loss={a.policy_loss} is on-policy only: "
                          f"set train.updates_per_batch=1 and mini_batches_per_pass=1 "
                          "or use a ratio-based loss (ppo_clip, gspo, cispo)")
    if upd.get("single_pass") and (t.updates_per_batch != 1 or t.mini_batches_per_pass != 1):
        raise ConfigError(f"algo.update={a.update} takes one natural-gradient step per batch: "
                          f"set train.updates_per_batch=1 and train.mini_batches_per_pass=1 "
                          f"(got {t.updates_per_batch} and {t.mini_batches_per_pass})")
    if t.updates_per_batch < upd.get("min_passes", 1):
        raise ConfigError(f"algo.update={a.update} needs train.updates_per_batch >= {upd['min_passes']} inner steps "
                          f"(got {t.updates_per_batch}); with one step its KL(pi || pi_old) term has no gradient")
    if a.dynamic_sampling.enabled and not adv.get("group_relative"):
        raise ConfigError(f"algo.dynamic_sampling.enabled=true drops groups with equal rewards, which only carry no "
                          f"gradient for group-relative estimators ("
                          f"{', '.join(n for n in ADVANTAGES.names() if ADVANTAGES.meta(n).get('group_relative'))}); "
                          f"algo.advantage={a.advantage} is not one")
