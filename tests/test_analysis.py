"""Analysis layer: head-set overlap (Fig. 6), granularity (Fig. 3), plotting, logit lens."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import hypergeom

from lofit_lens.analysis import plotting
from lofit_lens.config import LoFiTConfig
from lofit_lens.analysis.granularity import granularity_table, layer_distribution, layer_summary
from lofit_lens.analysis.logit_lens import bias_logit_lens
from lofit_lens.analysis.overlap import head_overlap, paper_style_matrix
from lofit_lens.result import LoFiTResult

torch.set_num_threads(1)

PAPER = Path("/work/shared/reference/lofit_paper_numbers.json")


def make_result(heads, n_layers=3, n_heads=4, d_head=4, task="t", seed=0, model="m"):
    gen = torch.Generator().manual_seed(seed)
    scores = torch.rand(n_layers, n_heads, generator=gen)
    bias = torch.zeros(n_layers, n_heads, d_head)
    for l, h in heads:
        bias[l, h] = torch.randn(d_head, generator=gen)
    return LoFiTResult(config=LoFiTConfig(task=task, seed=seed), model_id=model,
                       head_scores=scores, scale=torch.randn(n_layers, n_heads, d_head, generator=gen),
                       bias=bias, selected_heads=list(heads))


def from_counts(counts: dict[str, int], n_layers, n_heads, **kw):
    heads = [(int(l), h) for l, c in counts.items() for h in range(c)]
    return make_result(heads, n_layers=n_layers, n_heads=n_heads, d_head=2, **kw)


A = [(0, 0), (0, 1), (1, 0), (1, 1)]
B = [(0, 0), (0, 1), (2, 0), (2, 1)]


# ------------------------------------------------------------------ overlap
def test_overlap_hand_computed():
    rep = head_overlap([make_result(A, task="a"), make_result(B, task="b")])
    assert rep.labels == ["a/s0/m", "b/s0/m"]
    pair = rep.pairs.set_index(["row", "col"]).loc[("a/s0/m", "b/s0/m")]
    assert pair["method"] == "heads" and pair["intersection"] == 2 and pair["union"] == 6
    assert rep.jaccard_paper.iloc[0, 1] == pytest.approx(0.5)
    assert rep.iou.iloc[1, 0] == pytest.approx(1 / 3)
    assert rep.emd_layers.iloc[0, 1] == pytest.approx(0.5)  # {0:.5, 1:.5} vs {0:.5, 2:.5}
    assert rep.expected_random.iloc[0, 1] == pytest.approx(4 * 4 / 12 / 4)
    # P(X >= 2), X ~ Hypergeom(N=12, K=4, n=4): 1 - (C(8,4) + 4 C(8,3)) / C(12,4)
    assert rep.p_value.iloc[0, 1] == pytest.approx(201 / 495)
    assert rep.p_value.iloc[0, 1] == pytest.approx(hypergeom.sf(1, 12, 4, 4))
    assert np.allclose(np.diag(rep.jaccard_paper), 1) and np.allclose(np.diag(rep.emd_layers), 0)
    assert len(rep.pairs) == 3  # (a, a), (a, b), (b, b)


def test_emd_layer0_vs_layer2_and_unequal_k():
    low = make_result([(0, h) for h in range(4)], task="low")
    high = make_result([(2, 0), (2, 1)], task="high")
    rep = head_overlap([low, high])
    assert rep.emd_layers.iloc[0, 1] == pytest.approx(2.0)
    assert rep.emd_depth.iloc[0, 1] == pytest.approx(2.0 / 3)
    sub = head_overlap([make_result(A, task="a"), make_result(A[:2], task="sub")])
    assert sub.jaccard_paper.iloc[0, 1] == pytest.approx(1.0)  # K = min(Ki, Kj)
    assert sub.iou.iloc[0, 1] == pytest.approx(0.5)
    assert sub.expected_random.iloc[0, 1] == pytest.approx(4 * 2 / 12 / 2)


def test_duplicate_labels_rejected():
    with pytest.raises(ValueError, match="Duplicate labels"):
        head_overlap([make_result(A), make_result(B)])


def test_cross_model_uses_relative_depth():
    shallow = make_result([(0, 0), (0, 1)], n_layers=4, n_heads=2, model="small")
    deep = make_result([(0, 0), (1, 0)], n_layers=8, n_heads=4, model="big")
    rep = head_overlap([shallow, deep], n_permutations=200)
    pair = rep.pairs.iloc[1]
    assert pair["method"] == "depth_bins"
    # depths: {0.125, 0.125} vs {0.0625, 0.1875}; EMD 0.0625 = 0.25 layers of the 4-layer model
    assert rep.emd_depth.iloc[0, 1] == pytest.approx(0.0625)
    assert rep.emd_layers.iloc[0, 1] == pytest.approx(0.25)
    assert rep.emd_layers.attrs["ref_layers"] == 4
    # 10 bins: {1, 1} vs {0, 1} -> multiset intersection 1, union 3
    assert pair["intersection"] == 1 and pair["union"] == 3
    assert rep.jaccard_paper.iloc[0, 1] == pytest.approx(0.5)
    assert 0 < rep.expected_random.iloc[0, 1] < 1 and 0 < rep.p_value.iloc[0, 1] <= 1


def test_paper_figure6_emd_from_figure3_counts():
    paper = json.loads(PAPER.read_text())
    fig3, fig6 = paper["figure3"]["data"], paper["figure6"]["emd_layers"]
    n_heads = {"Gemma-7B": 16, "Llama-2-7B": 32, "Llama-2-13B": 40}
    for model, tasks in fig3.items():
        by_task = {task: [from_counts(d["heads_per_layer"], d["n_layers"], n_heads[model],
                                      task=task, model=model)]
                   for task, d in tasks.items()}
        rep = paper_style_matrix(by_task)
        assert rep.labels == ["TruthfulQA", "MQuAKE", "CLUTRR"]
        expected = np.array(fig6[model])[:3, :3]
        off = ~np.eye(3, dtype=bool)
        assert np.abs(rep.emd_layers.to_numpy()[off] - expected[off]).max() <= 0.006, model
    # The paper's Fig. 6 EMD for Llama-2-7B TruthfulQA vs MQuAKE
    llama = fig3["Llama-2-7B"]
    rep = head_overlap([from_counts(llama[t]["heads_per_layer"], 32, 32, task=t)
                        for t in ("TruthfulQA", "MQuAKE")])
    assert round(rep.emd_layers.iloc[0, 1], 2) == 4.34


def test_paper_style_matrix_puts_seeds_on_diagonal():
    s0 = make_result(A, task="x", seed=0)
    s1 = make_result(A[:3] + [(2, 3)], task="x", seed=1)
    other = make_result(B, task="y", seed=0)
    rep = paper_style_matrix({"x": [s0, s1], "y": [other]})
    assert rep.jaccard_paper.loc["x", "x"] == pytest.approx(0.75)  # seed 0 vs seed 1
    assert rep.jaccard_paper.loc["y", "y"] == pytest.approx(1.0)  # single result: itself
    assert rep.jaccard_paper.loc["x", "y"] == pytest.approx(0.5)  # seed 0 vs seed 0
    diag = rep.pairs.set_index(["row", "col"]).loc[("x", "x")]
    assert (diag["result_i"], diag["result_j"]) == ("x/s0/m", "x/s1/m")


# ------------------------------------------------------------------ granularity
def test_layer_distribution_and_summary():
    heads = [(0, 0), (1, 0), (1, 1), (2, 0), (5, 0), (5, 1), (8, 0), (8, 1)]
    r = make_result(heads, n_layers=9, n_heads=2)
    dist = layer_distribution(r)
    assert dist["count"].tolist() == [1, 2, 1, 0, 0, 2, 0, 0, 2]
    assert dist["percent"].sum() == pytest.approx(100)
    s = layer_summary(r)  # thirds: [0, 3), [3, 6), [6, 9)
    assert s["peak_layers"] == [1, 5, 8] and s["peak_count"] == 2
    assert (s["frac_lower"], s["frac_middle"], s["frac_upper"]) == (0.5, 0.25, 0.25)
    assert s["n_segments"] == 3 and s["longest_run"] == 3 and s["n_layers_used"] == 5
    assert s["mean_gap"] == pytest.approx((0 + 0 + 2 + 2) / 4)
    table = granularity_table([r, make_result([(3, 0)], n_layers=9, n_heads=2, seed=1)])
    assert list(table.index) == ["t/s0/m", "t/s1/m"] and table.loc["t/s1/m", "frac_middle"] == 1


def test_layer_summary_uneven_thirds():
    r = make_result([(9, 0), (10, 0)], n_layers=11, n_heads=1)  # b = 3: upper third is [6, 11)
    s = layer_summary(r)
    assert s["frac_upper"] == 1.0 and np.isnan(layer_summary(make_result([], 3, 1))["mean_gap"])


# ------------------------------------------------------------------ plotting
def test_plot_heads_shapes_and_hover():
    r = make_result(A, n_layers=3, n_heads=4)
    for value in ("scores", "scale_norm", "bias_norm", "selected"):
        fig = plotting.plot_heads(r, value=value)
        heat, marks = fig.data
        assert np.asarray(heat.z).shape == (3, 4)
        assert heat.text[2][1] == "L2H1" and "%{z" in heat.hovertemplate
        assert list(marks.x) == [0, 1, 0, 1] and list(marks.y) == [0, 0, 1, 1]
        assert marks.text[0] == "L0H0 (rank 1)"
    assert np.allclose(plotting.plot_heads(r, "bias_norm").data[0].z, r.bias.norm(dim=-1).numpy())
    assert np.allclose(plotting.plot_heads(r, "selected").data[0].z, r.selected_mask.numpy())
    assert len(plotting.plot_heads(r, show_selected=False).data) == 1
    with pytest.raises(ValueError, match="choose one of"):
        plotting.plot_heads(r, value="nope")


def test_plot_layer_distribution_panels():
    results = [make_result(A, task=t, seed=s, model=m, n_layers=6)
               for m in ("m1", "m2") for t in ("a", "b", "c") for s in (0, 1)]
    fig = plotting.plot_layer_distribution(results)
    assert len(fig.data) == 12 and len(fig.layout.annotations) == 6  # 6 panel titles
    dashed = [s for s in fig.layout.shapes if s.line.dash == "dash"]
    assert len(dashed) == 12 and sorted({s.x0 for s in dashed}) == [2, 4]
    assert list(fig.data[0].y[:2]) == [50.0, 50.0]


def test_plot_overlap_and_transfer_text():
    frame = pd.DataFrame([[1.0, 0.25], [0.25, 1.0]], index=["a", "b"], columns=["a", "b"])
    fig = plotting.plot_overlap(frame, title="J")
    assert fig.data[0].text[0][1] == "0.25" and fig.layout.title.text == "J"
    marks = pd.DataFrame([["", "*"], ["+", ""]], index=["a", "b"], columns=["a", "b"])
    fig = plotting.plot_transfer(frame, marks=marks)
    assert fig.data[0].text[0][1] == "0.25*" and fig.data[0].text[1][0] == "0.25+"
    assert plotting.plot_transfer(frame).data[0].text[0][0] == "1.00"


def test_save_figure_html_and_png(tmp_path):
    fig = plotting.plot_overlap(pd.DataFrame([[1.0]], index=["a"], columns=["a"]))
    if plotting.find_browser() is None:
        pytest.skip("no Chrome/Chromium for kaleido: run scripts/install_system_deps.sh")
    paths = plotting.save_figure(fig, tmp_path / "sub" / "fig")
    assert [p.name for p in paths] == ["fig.html", "fig.png"]
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths[1].stat().st_size > 1000


def test_save_figure_without_browser_explains(tmp_path, monkeypatch):
    monkeypatch.setattr(plotting, "find_browser", lambda: None)
    fig = plotting.plot_overlap(pd.DataFrame([[1.0]], index=["a"], columns=["a"]))
    with pytest.raises(RuntimeError, match="apt-get install -y chromium"):
        plotting.save_figure(fig, tmp_path / "fig", formats=("png", "html"))
    assert (tmp_path / "fig.html").stat().st_size > 0


# ------------------------------------------------------------------ logit lens
class _Tok:
    def decode(self, ids):
        return "".join(f"<{i}>" for i in ids)


def test_bias_logit_lens_on_stub():
    n_layers, n_heads, d_head, d_model, vocab = 2, 3, 2, 4, 6
    w_o = torch.zeros(n_layers, n_heads, d_head, d_model)
    w_o[1, 2, 0, 3] = 1.0  # head L1H2 writes its first coordinate into residual dim 3
    w_o[0, 1, 1, 0] = 2.0  # head L0H1 writes its second coordinate (x2) into dim 0
    w_u = torch.zeros(d_model, vocab)
    w_u[3, 5], w_u[3, 4], w_u[0, 1] = 3.0, 1.0, 1.0
    model = SimpleNamespace(W_O=w_o, W_U=w_u, tokenizer=_Tok(), ln_final=lambda x: -x)
    r = make_result([(1, 2), (0, 1)], n_layers=n_layers, n_heads=n_heads, d_head=d_head)
    r.bias[1, 2] = torch.tensor([1.0, 0.0])
    r.bias[0, 1] = torch.tensor([0.0, 0.5])
    df = bias_logit_lens(model, r, top_k=2)
    assert df[["layer", "head", "rank"]].values.tolist() == [[1, 2, 1], [0, 1, 2]]
    assert df.loc[0, "top_tokens"] == ["<5>", "<4>"] and df.loc[0, "top_logits"] == [3.0, 1.0]
    assert df.loc[1, "top_tokens"][0] == "<1>" and df.loc[1, "top_logits"][0] == 1.0
    assert df.loc[1, "v_norm"] == pytest.approx(0.5) and df.loc[1, "out_norm"] == pytest.approx(1.0)
    flipped = bias_logit_lens(model, r, top_k=1, heads=[(1, 2)], apply_ln=True)
    assert flipped.loc[0, "top_logits"] == [0.0]  # -direction: the best logit is 0
    with pytest.raises(ValueError, match="W_O has shape"):
        bias_logit_lens(model, make_result(A))


@pytest.mark.slow
def test_bias_logit_lens_smollm2_matches_attention_output():
    from lofit_lens.backends.models import load_model

    model = load_model()
    dims = (model.cfg.n_layers, model.cfg.n_heads, model.cfg.d_head)
    assert tuple(model.W_O.shape) == (*dims, model.cfg.d_model)  # per query head under GQA
    heads = [(3, 7), (3, 1)]  # one layer, two KV groups: layer 3's attn_out moves by sum v W_O
    r = make_result(heads, *dims, model=model.lofit_model_id)
    tokens = model.to_tokens("The capital of France is")
    name = "blocks.3.hook_attn_out"
    _, clean = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    with r.apply(model):
        _, steered = model.run_with_cache(tokens, names_filter=lambda n: n == name)
    delta = (steered[name] - clean[name])[0]
    expected = sum(r.bias[l, h] @ model.W_O[l, h] for l, h in heads)
    torch.testing.assert_close(delta, expected.expand_as(delta), atol=1e-4, rtol=1e-3)
    df = bias_logit_lens(model, r, top_k=5)
    assert len(df) == 2 and all(len(t) == 5 and isinstance(t[0], str) for t in df["top_tokens"])
    assert len(bias_logit_lens(model, r, top_k=3, apply_ln=True)) == 2
