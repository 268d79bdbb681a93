"""The algorithms' pure math, looked up by name: `advantages` (estimators), `policy_losses`, `dynamic_sampling`
(DAPO's re-sampling bookkeeping), `process` (step rewards to token positions), `critic` (PPO's value model),
`mc_labels` (Math-Shepherd's Monte-Carlo step labels of policy samples)."""
