"""A thin SimCSE trainer on top of :func:`simcse_kernels.fused_info_nce`.

Modules (one job each):

* :mod:`.pooling` — SimCSE's poolers and its MLP head.
* :mod:`.model` — encoder (any HF ``AutoModel``) + pooler + optional MLM head.
* :mod:`.tiny` — an offline tiny BERT + tokenizer (tests, CPU smoke runs).
* :mod:`.data` — unsup text / sup CSV data sets, tokenization, resumable batch order.
* :mod:`.objective` — the contrastive objectives (unsup, sup, MixCSE, symmetric) on embeddings.
* :mod:`.grad_cache` — gradient caching with RNG replay.
* :mod:`.distributed` — cross-GPU negatives (all_gather with gradient) and gradient averaging.
* :mod:`.checkpoint` — training state save/resume and the transformers / sentence-transformers export.
* :mod:`.sts_eval` — STS12–16, STS-B, SICK-R and alignment / uniformity.
* :mod:`.trainer` — the training loop; :mod:`.cli` — ``simcse-train`` / ``simcse-eval``.

Heavy dependencies (``transformers``, ``scipy``) are imported inside the submodules that need them.
"""
