"""--task metric: the embedding network's contract, pytorch-metric-learning's losses on the network's own proxies,
the retrieval figures against pytorch-metric-learning's AccuracyCalculator and a naive loop, config refusals, a
run's round trip through load_run, and the command line."""

import copy
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import pupil
from pupil.cli import main
from pupil.config import MetricConfig, OptimConfig, build
from pupil.errors import PupilError
from pupil.models import EmbeddingNet, PixelEmbedder, PixelModel, check_contract, create
from pupil.predict import predict_logits
from pupil.run import load_run
from pupil.training.loop import fit
from pupil.training.optim import create_optimizer
from pupil.training.tasks import MetricTask, retrieval_scores

pml = pytest.importorskip("pytorch_metric_learning")


def embed(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.forward_head(net.forward_features(x), pre_logits=True)


@pytest.mark.parametrize("name,dim", [("lenet5", 64), ("resnet20", 128), ("vit_test", 96)])
def test_embedding_is_unit_length_and_the_logits_are_scaled_cosines_to_the_proxies(name, dim):
    net = create(name, num_classes=7, in_chans=1, img_size=28, embed_dim=dim)
    assert isinstance(net, EmbeddingNet) and net.num_features == net.embedding_dim == dim
    check_contract(create(name, num_classes=7, in_chans=1, img_size=28, embed_dim=dim), 1, 28)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        e, logits = embed(net.eval(), x), net(x)
    assert e.shape == (4, dim) and torch.allclose(e.norm(dim=1), torch.ones(4), atol=1e-5)
    # naive: s * <e, p_c / |p_c|> for each class c
    s = net.head.log_scale.exp().item()
    naive = [[s * torch.dot(e[i], p / p.norm()) for p in net.head.weight.detach()] for i in range(4)]
    assert logits.shape == (4, 7) and torch.allclose(logits, torch.tensor(naive), atol=1e-5)
    assert net.trunk.num_classes == 0  # the trunk's own classifier is gone


def test_timm_trunks_and_token_maps_carry_over():
    net = create("timm:resnet18", num_classes=3, in_chans=1, img_size=32, embed_dim=64)
    check_contract(net, 1, 32)
    vit = create("vit_test", num_classes=3, in_chans=1, img_size=28, embed_dim=64)
    assert vit.feature_grid == vit.trunk.feature_grid and vit.gradcam_layer == f"trunk.{vit.trunk.gradcam_layer}"


@pytest.mark.parametrize("bad", [0, -3, 1.5, "big", True])
def test_bad_embed_dims_are_one_line_errors(bad):
    with pytest.raises(PupilError, match="embed_dim must be a positive integer") as e:
        create("lenet5_test", embed_dim=bad)
    assert "\n" not in str(e.value)


def test_unknown_model_argument_names_embed_dim_as_taken():
    with pytest.raises(PupilError, match=r"no argument 'widht'; it takes .*embed_dim"):
        create("lenet5_test", widht=3, embed_dim=64)


@pytest.mark.parametrize("kind,key", [("arcface", "W"), ("proxyanchor", "proxies")])
def test_proxy_losses_train_the_networks_proxies_exactly_as_the_library_trains_its_own(kind, key):
    torch.manual_seed(0)
    net = create("lenet5_test", num_classes=4, in_chans=1, img_size=16, embed_dim=64)
    x, y = torch.rand(12, 1, 16, 16), torch.arange(12) % 4
    task = MetricTask(MetricConfig(metric_loss=kind), num_classes=4, embed_dim=64)
    e = embed(net, x)
    ours = task.metric_loss(e, y, net.head.weight)
    ours.backward()
    # The reference: the library's loss with its own parameter set to the network's proxies.
    ref = pml.losses.ArcFaceLoss(4, 64) if kind == "arcface" else pml.losses.ProxyAnchorLoss(4, 64)
    w = net.head.weight.detach().clone()
    getattr(ref, key).data = w.t().clone() if kind == "arcface" else w
    expected = ref(e.detach(), y)
    expected.backward()
    grad = getattr(ref, key).grad
    assert ours.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(net.head.weight.grad, grad.t() if kind == "arcface" else grad, atol=1e-6)
    # The proxies are parameters of the network: the optimizer moves them and model.safetensors saves them.
    opt = create_optimizer(PixelModel(net, [0.5], [0.5]), OptimConfig())
    assert any(p is net.head.weight for g in opt.param_groups for p in g["params"])
    assert "head.weight" in net.state_dict() and "head.log_scale" in net.state_dict()


def test_multisimilarity_uses_the_miners_pairs():
    torch.manual_seed(0)
    e, y = F.normalize(torch.randn(16, 64), dim=1), torch.arange(16) % 4
    task = MetricTask(MetricConfig(metric_loss="multisimilarity", miner_epsilon=0.05), num_classes=4, embed_dim=64)
    miner = pml.miners.MultiSimilarityMiner(epsilon=0.05)
    expected = pml.losses.MultiSimilarityLoss()(e, y, miner(e, y))
    assert task.metric_loss(e, y, None).item() == pytest.approx(expected.item(), rel=1e-6)
    no_miner = MetricTask(MetricConfig(metric_loss="multisimilarity", miner=False), num_classes=4, embed_dim=64)
    assert no_miner.metric_loss(e, y, None).item() == pytest.approx(pml.losses.MultiSimilarityLoss()(e, y).item())


def naive_recall_at_1(q: torch.Tensor, qy: torch.Tensor, g: torch.Tensor, gy: torch.Tensor, same: bool) -> float:
    hits = 0
    for i in range(len(q)):
        best, best_j = -2.0, -1
        for j in range(len(g)):
            if same and i == j:
                continue
            s = float(q[i] @ g[j])
            if s > best:
                best, best_j = s, j
        hits += int(gy[best_j] == qy[i])
    return hits / len(q)


def naive_map_at_r(q: torch.Tensor, qy: torch.Tensor, g: torch.Tensor, gy: torch.Tensor, same: bool) -> float:
    total = 0.0
    for i in range(len(q)):
        order = [j for j in sorted(range(len(g)), key=lambda j: -float(q[i] @ g[j])) if not (same and j == i)]
        r = sum(int(gy[j] == qy[i]) for j in order)
        hits, ap = 0, 0.0
        for rank, j in enumerate(order[:r], start=1):
            if gy[j] == qy[i]:
                hits += 1
                ap += hits / rank
        total += ap / r
    return total / len(q)


def test_retrieval_scores_match_a_naive_loop_and_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    torch.manual_seed(0)
    centres = F.normalize(torch.randn(3, 8), dim=1)
    qy, gy = torch.arange(60) % 3, torch.arange(90) % 3
    q = F.normalize(centres[qy] + 0.6 * torch.randn(60, 8), dim=1)
    g = F.normalize(centres[gy] + 0.6 * torch.randn(90, 8), dim=1)
    calc = AccuracyCalculator(include=("precision_at_1", "mean_average_precision_at_r"), device=torch.device("cpu"))
    for args, same in (((q, qy), True), ((q, qy, g, gy), False)):
        ours = retrieval_scores(*args, chunk=7)  # chunks that do not divide the queries
        ref_g, ref_gy = (q, qy) if same else (g, gy)
        assert ours["recall_at_1"] == pytest.approx(naive_recall_at_1(q, qy, ref_g, ref_gy, same), abs=1e-6)
        assert ours["map_at_r"] == pytest.approx(naive_map_at_r(q, qy, ref_g, ref_gy, same), abs=1e-6)
        lib = calc.get_accuracy(q, qy) if same else calc.get_accuracy(q, qy, g, gy, ref_includes_query=False)
        assert ours["recall_at_1"] == pytest.approx(lib["precision_at_1"], abs=1e-6)
        assert ours["map_at_r"] == pytest.approx(lib["mean_average_precision_at_r"], abs=1e-6)


@pytest.mark.parametrize("loss", ["arcface", "proxyanchor", "multisimilarity"])
def test_each_loss_learns_an_embedding_that_retrieves_its_class(loss):
    torch.manual_seed(0)
    train, test = pupil.data.load("synthetic", "train"), pupil.data.load("synthetic", "test")
    net = create("lenet5_test", num_classes=4, in_chans=1, img_size=16, embed_dim=64)
    model = PixelModel(net, [0.5], [0.25])
    task = MetricTask(MetricConfig(metric_loss=loss), num_classes=4, embed_dim=64)
    opt = create_optimizer(model, OptimConfig(opt="adamw", lr=1e-2, momentum=0.9))
    proxies = net.head.weight.detach().clone()
    losses = []
    for step in range(150):
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(step))[:64]
        out = task(model, train.images[idx].float() / 255, train.targets[idx])
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    assert sum(losses[-10:]) / 10 < 0.5 * sum(losses[:5]) / 5, losses
    assert not torch.equal(net.head.weight, proxies)  # the proxies (or the pair loss's classifier) were trained
    e = predict_logits(PixelEmbedder(model), test)
    y = test.targets
    sim = e @ e.t()
    same = (y[:, None] == y[None]) & ~torch.eye(len(y), dtype=torch.bool)
    different = y[:, None] != y[None]
    assert sim[same].mean() > sim[different].mean() + 0.3  # the same class ends closer than a different one
    n = 128
    recall = naive_recall_at_1(e[:n], y[:n], e[:n], y[:n], same=True)
    assert recall > 0.8  # chance is 0.25
    assert retrieval_scores(e[:n], y[:n])["recall_at_1"] == pytest.approx(recall)
    assert (predict_logits(model, test).argmax(1) == y).float().mean() > 0.8  # the cosine classifier reads it


def smoke(tmp_path, recipe, name, **over):
    return build(recipe, dict(out=str(tmp_path), name=name, task="metric", epochs=1.0, **over))


def test_a_metric_run_loads_by_name_with_its_embedding_and_proxies(tmp_path, smoke_recipe):
    cfg = smoke(tmp_path, smoke_recipe, "m", metric_loss="proxyanchor", model_args={"embed_dim": 64})
    last = {}
    run = fit(cfg, progress=False, on_epoch=lambda state, record: last.update(model=copy.deepcopy(state.deployed)))
    assert run.info["model"]["kwargs"]["embed_dim"] == 64
    assert run.info["config"]["task"]["metric_loss"] == "proxyanchor"
    loaded = load_run(run.dir)
    net = loaded.model.net
    assert isinstance(net, EmbeddingNet) and net.embedding_dim == 64
    test = pupil.data.load("synthetic", "test")
    x = test.images[:16].float() / 255
    trained = last["model"].eval()  # the weights in memory at the end of training
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), trained(x), atol=1e-5)
        assert torch.allclose(PixelEmbedder(loaded.model)(x), PixelEmbedder(trained)(x), atol=1e-6)
    task = MetricTask.from_config(cfg, torch.device("cpu"), classes=run.classes)
    val = loaded.split("val")
    figures = task.validate(loaded.model, val)
    assert figures == retrieval_scores(predict_logits(PixelEmbedder(loaded.model), val), val.targets)


def test_the_metric_task_defaults_to_128_dimensions_and_the_cli_trains_it(tmp_path, smoke_recipe, capsys):
    argv = ["train", str(smoke_recipe), "--out", str(tmp_path), "--epochs", "1", "--no-progress"]
    assert main([*argv, "--task", "metric", "--metric-loss", "multisimilarity", "--ms-base", "0.4"]) == 0
    info = json.loads((tmp_path / "synthetic" / "run.json").read_text())
    assert info["model"]["kwargs"]["embed_dim"] == 128 and info["config"]["task"]["ms_base"] == 0.4
    assert info["status"] == "finished" and 0 <= info["history"]["best_val_top1"] <= 1
    capsys.readouterr()
    assert main([*argv, "--name", "bad", "--task", "metric", "--metric-loss", "triplet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown metric loss 'triplet'" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "over,message",
    [
        ({"metric_loss": "triplet"}, "unknown metric loss 'triplet'; choose arcface, proxyanchor, multisimilarity"),
        ({"model_args": {"embed_dim": 32}}, "embeddings of 64 to 128 dimensions; model_args embed_dim is 32"),
        ({"model_args": {"embed_dim": 512}}, "64 to 128 dimensions"),
        ({"model_args": {"embed_dim": "wide"}}, "embed_dim must be a positive integer, not 'wide'"),
        ({"metric_loss": "multisimilarity", "metric_margin": 0.2}, "metric_margin is a setting of the proxy losses"),
        ({"ms_beta": 40.0}, "ms_beta is a setting of the multisimilarity loss, not of arcface"),
        ({"metric_margin": 95.0}, "metric_margin of arcface must be >= 0 and below 90"),
        ({"metric_loss": "proxyanchor", "metric_scale": 0.0}, "must be positive"),
        ({"mixup": 0.2}, "turn mixup and cutmix off"),
        ({"pretrained": True, "model": "timm:efficientnet_lite0"}, "cannot start from --pretrained"),
    ],
)
def test_config_refusals_are_one_line(tmp_path, smoke_recipe, over, message):
    with pytest.raises(PupilError) as e:
        smoke(tmp_path, smoke_recipe, "bad", **over)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_metric_settings_are_refused_for_other_tasks(smoke_recipe):
    with pytest.raises(PupilError, match="--metric-loss is a setting of the metric task, not of classification"):
        build(smoke_recipe, {"metric_loss": "proxyanchor"})


def test_pytorch_metric_learning_loads_only_when_the_task_is_chosen():
    code = "import sys, pupil.training.tasks, pupil.models; assert 'pytorch_metric_learning' not in sys.modules"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
