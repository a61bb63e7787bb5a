"""SafetyDPO (Liu et al., ICCV 2025): per-category LoRA experts trained with Diffusion-DPO on (unsafe, safe twin)
pairs, merged into one LoRA by ``merge.method`` (Co-Merge by default). The experts come from the `train` stages
(``safealign.training``), the merge from the `merge` stage (``safealign.merging``); this method hands the merged
LoRA to evaluation."""
