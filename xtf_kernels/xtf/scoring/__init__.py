"""The phases of :func:`xtf_kernels.xtf.pipeline.score_dataset`, one module each.

* :mod:`.models`: device / dtype resolution and checkpoint loading;
* :mod:`.prepare`: argument checks, tokenisation, the run's settings and fingerprint, the
  output directory (a :class:`~.prepare.ScoreRun` carries all of it through the passes);
* :mod:`.pass1`: model forward per shard (RI, KN, log-probs, entropy) -> ``pass1/``;
  with ``pack=True`` a shard goes through :mod:`.pass1_packed` instead (whole examples packed
  into rows, the records of an unpacked run), which plans the rows with :mod:`.packing`;
* :mod:`.reduce`: dataset-global reductions between the passes (TR domain vector and scores,
  Multi-Otsu thresholds);
* :mod:`.pass2`: TR scores, the rules -> ``tokens/``;
* :mod:`.totals`: counts reduced across ranks -> ``summary.json``.

``score_dataset`` (in :mod:`xtf_kernels.xtf.pipeline`) calls them in that order.
"""
