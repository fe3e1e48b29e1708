"""On-policy distillation steps: which optimizer steps learn from student rollouts (``schedule``), and how the
rollouts of a step's prompts become Contract 2 micro-batches (``batch``). No deepspeed here: generation is
``dskd_scale.engine.rollout``, passed in by the loop as a function."""

from dskd_scale.onpolicy.batch import RolloutPlan, RolloutStats, plan_rollouts, rollout_micro_batches, step_prompts
from dskd_scale.onpolicy.schedule import is_on_policy_step, rollout_generator_seed

__all__ = ["RolloutPlan", "RolloutStats", "is_on_policy_step", "plan_rollouts", "rollout_generator_seed",
           "rollout_micro_batches", "step_prompts"]
