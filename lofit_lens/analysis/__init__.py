"""The analysis layer on top of LoFiT runs: cached cells, head overlap, granularity, transfer,
sweeps, logit lens and plotting. The core never imports it."""
