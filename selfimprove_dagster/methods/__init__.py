"""Who critiques a round's generations and what the round trains on.

`recipe` names the methods (star, self_consistency, self_judge, self_refine) and
dispatches to the critics (`star`, `consistency`, `judge`, `refine`) and to the
selection of the training set; `critique_rows` is the one shape every critic writes.

Promise: every critique row carries the `generation_id` it judges; the training set
carries the ids of the rows it came from, so lineage runs back to the generations.
"""
