"""The algorithm core: small pure torch functions in registries, picked by name from a recipe."""
from rlhf.algos.advantages import ADVANTAGES, AdvantageInputs
from rlhf.algos.aggregate import LOSS_AGGREGATIONS, LossNormalizer
from rlhf.algos.is_correction import IS_CORRECTIONS, logp_gap
from rlhf.algos.kl import KL_ESTIMATORS
from rlhf.algos.policy_loss import POLICY_LOSSES

__all__ = ["ADVANTAGES", "AdvantageInputs", "IS_CORRECTIONS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS", "LossNormalizer",
           "POLICY_LOSSES", "logp_gap"]
