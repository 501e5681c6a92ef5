"""The algorithm core: small pure torch functions in registries, picked by name from a recipe.

    ADVANTAGES         algo.advantage     (inp, cfg) -> (adv_NT, ret_NT)
    POLICY_LOSSES      algo.policy_loss   (logp_NT, old_logp_NT, adv_NT, mask_NT, cfg) -> (loss_NT, stats)
    KL_ESTIMATORS      algo.kl.estimator  (logp_NT, ref_logp_NT) -> kl_NT
    LOSS_AGGREGATIONS  algo.loss_agg      (loss_NT, mask_NT, norm) -> scalar
    UPDATES            algo.update        (cfg) -> UpdateRule
                                          (first-order passes + an extra loss term, or a natural step)

docs/algorithms.md lists every name with its formula and paper.
"""
from rlhf.algos.advantages import ADVANTAGES, AdvantageInputs
from rlhf.algos.aggregate import LOSS_AGGREGATIONS, LossNormalizer
from rlhf.algos.is_correction import IS_CORRECTIONS, logp_gap
from rlhf.algos.kl import KL_ESTIMATORS
from rlhf.algos.policy_loss import POLICY_LOSSES
from rlhf.algos.updates import UPDATES, ExtraLoss, NaturalProblem, UpdateRule

__all__ = ["ADVANTAGES", "AdvantageInputs", "ExtraLoss", "IS_CORRECTIONS", "KL_ESTIMATORS", "LOSS_AGGREGATIONS",
           "LossNormalizer", "NaturalProblem", "POLICY_LOSSES", "UPDATES", "UpdateRule", "logp_gap"]
