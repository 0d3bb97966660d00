"""Human feedback: comparison batches, the labeling app and its store, scores, agreement, rankings -> pairs.

Pure logic lives in :mod:`.scores` (Bradley-Terry / Elo with bootstrap
intervals), :mod:`.agreement` (labeler quality) and :mod:`.rankings` (rankings
-> pairs and comparisons); :mod:`.store` keeps batches and submissions in SQL,
:mod:`.app` serves the labeling page and its HTTP API, :mod:`.simulate` drives
that API with simulated labelers.
"""
