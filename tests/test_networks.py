"""The slab denoiser: shapes for every slab size, the separation label, and checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from bundle.networks import SlabDenoiser, adapt_slab_state_dict, deepen_state_dict, for_inference, load_weights

TINY = dict(channels=(8, 16), attention_levels=(False, True), norm_num_groups=8, num_head_channels=8)


@pytest.mark.parametrize("slab_size", [1, 3, 5])
def test_output_has_input_shape(slab_size: int) -> None:
    net = SlabDenoiser(slab_size=slab_size, **TINY)
    x = torch.randn(2, slab_size, 16, 16)
    out = net(x, torch.tensor([10, 900]), torch.tensor([1, 3]))
    assert out.shape == x.shape


def test_separation_changes_the_prediction() -> None:
    torch.manual_seed(0)
    net = SlabDenoiser(slab_size=3, **TINY)
    for p in net.parameters():  # MONAI zero-initialises the output convolution
        torch.nn.init.normal_(p, std=0.2)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    assert not torch.allclose(net(x, t, torch.tensor([1])), net(x, t, torch.tensor([3])))


def test_wrong_slab_size_is_refused() -> None:
    net = SlabDenoiser(slab_size=3, **TINY)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        net(torch.randn(1, 1, 16, 16), torch.tensor([1]), torch.tensor([1]))


def test_load_weights_round_trip(tmp_path) -> None:
    net = SlabDenoiser(slab_size=3, **TINY)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    other = load_weights(SlabDenoiser(slab_size=3, **TINY), tmp_path / "m.pt")
    for a, b in zip(net.state_dict().values(), other.state_dict().values()):
        assert torch.equal(a, b)


def test_priors_load_networks_for_inference_in_channels_last_with_the_same_output(tmp_path) -> None:
    """Prior.load gives the eval-mode, channels-last network; its eps matches the default layout's to rounding."""
    from bundle.workflows.priors import Priors

    net = SlabDenoiser(slab_size=3, **TINY)
    torch.save(net.state_dict(), tmp_path / "m.pt")
    loaded, record = Priors(SlabDenoiser(slab_size=3, **TINY), tmp_path / "m.pt").for_method("dbpp").load("cpu", "dbpp")
    assert not loaded.training and record["path"].endswith("m.pt")
    convs = [p for p in loaded.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    x, t, s = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([1, 3])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t, s), net.eval()(x, t, s), atol=1e-5)
    assert for_inference(SlabDenoiser(slab_size=1, **TINY)).training is False


def test_checkpoint_for_another_slab_size_names_file_and_problem(tmp_path) -> None:
    torch.save(SlabDenoiser(slab_size=1, **TINY).state_dict(), tmp_path / "k1.pt")
    with pytest.raises(ValueError, match=r"k1\.pt was saved for another network.*slab_size=3"):
        load_weights(SlabDenoiser(slab_size=3, **TINY), tmp_path / "k1.pt")


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_unreadable_checkpoint_names_file(tmp_path, content: bytes) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(ValueError, match="bad.pt is not a readable state dict"):
        load_weights(SlabDenoiser(**TINY), tmp_path / "bad.pt")


def test_missing_checkpoint(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_weights(SlabDenoiser(**TINY), tmp_path / "nope.pt")


def _trained_like(slab_size: int, separations=(1, 2, 3)) -> SlabDenoiser:
    torch.manual_seed(slab_size)
    net = SlabDenoiser(slab_size=slab_size, separations=separations, **TINY)
    for p in net.parameters():  # MONAI zero-initialises the output convolution
        torch.nn.init.normal_(p, std=0.2)
    return net.eval()


def test_adapting_a_slab_prior_to_2d_keeps_its_response_to_z_constant_slabs() -> None:
    source = _trained_like(3)
    target = SlabDenoiser(slab_size=1, separations=(1,), **TINY)
    target.load_state_dict(adapt_slab_state_dict(source.state_dict(), target))
    target.eval()

    image = torch.randn(2, 1, 16, 16)
    t, sep = torch.tensor([5, 700]), torch.tensor([1, 1])
    # the first layer sees one slice as the source saw three equal ones
    torch.testing.assert_close(target.unet.conv_in(image), source.unet.conv_in(image.repeat(1, 3, 1, 1)))
    # the body and the separation-1 embedding are the source's; the output is its centre channel
    with torch.no_grad():
        torch.testing.assert_close(target(image, t, sep), source(image.repeat(1, 3, 1, 1), t, sep)[:, 1:2])
    torch.testing.assert_close(target.unet.class_embedding.weight, source.unet.class_embedding.weight[:2])


def test_adapting_five_slices_to_three_assigns_channels_by_position() -> None:
    source, target = _trained_like(5), SlabDenoiser(slab_size=3, **TINY)
    state = adapt_slab_state_dict(source.state_dict(), target)
    w = source.state_dict()["unet.conv_in.conv.weight"]
    # source offsets -2..2 go to target offsets -1, -1 (tie: nearest first), 0, 1, 1
    torch.testing.assert_close(state["unet.conv_in.conv.weight"][:, 1], w[:, 2])
    torch.testing.assert_close(state["unet.conv_in.conv.weight"].sum(1), w.sum(1))
    torch.testing.assert_close(state["unet.out.2.conv.bias"], source.state_dict()["unet.out.2.conv.bias"][[1, 2, 3]])


def test_adapting_to_more_slices_or_another_network_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer slices"):
        adapt_slab_state_dict(_trained_like(1, (1,)).state_dict(), SlabDenoiser(slab_size=3, **TINY))
    with pytest.raises(ValueError, match="not the state dict of a SlabDenoiser"):
        adapt_slab_state_dict({"weight": torch.zeros(1)}, SlabDenoiser(slab_size=1, **TINY))
    wider = SlabDenoiser(slab_size=3, channels=(16, 16), attention_levels=(False, True), num_head_channels=8)
    with pytest.raises(ValueError, match="does not map onto"):
        adapt_slab_state_dict(wider.state_dict(), SlabDenoiser(slab_size=1, **TINY))


@pytest.mark.parametrize(("shallow", "deep"), [(1, 2), (1, 3), (2, 3)])
def test_a_deepened_prior_computes_the_function_of_the_shallow_one(shallow, deep) -> None:
    source = SlabDenoiser(slab_size=3, num_res_blocks=shallow, **TINY)
    for p in source.parameters():  # every tensor non-zero, so no block can hide behind MONAI's zero init
        torch.nn.init.normal_(p, std=0.2)
    source.eval()
    target = SlabDenoiser(slab_size=3, num_res_blocks=deep, **TINY).eval()
    target.load_state_dict(deepen_state_dict(source.state_dict(), target))

    x, t, sep = torch.randn(2, 3, 16, 16), torch.tensor([5, 700]), torch.tensor([1, 3])
    with torch.no_grad():
        torch.testing.assert_close(target(x, t, sep), source(x, t, sep), rtol=1e-6, atol=1e-6)
    assert sum(p.numel() for p in target.parameters()) > sum(p.numel() for p in source.parameters())

    # the new blocks learn: one gradient step moves their zero-initialised last layers
    target.train()
    target(x, t, sep).square().mean().backward()
    new_conv2 = target.unet.down_blocks[0].resnets[deep - 1].conv2.conv.weight
    assert new_conv2.grad is not None and new_conv2.grad.abs().sum() > 0


def test_deepening_to_fewer_blocks_or_from_another_network_is_refused() -> None:
    deep = SlabDenoiser(slab_size=3, num_res_blocks=2, **TINY)
    with pytest.raises(ValueError, match="can only add residual blocks"):
        deepen_state_dict(deep.state_dict(), SlabDenoiser(slab_size=3, num_res_blocks=2, **TINY))
    with pytest.raises(ValueError, match="not the state dict of a SlabDenoiser"):
        deepen_state_dict({"weight": torch.zeros(1)}, deep)
    with pytest.raises(ValueError, match="does not map onto"):
        deepen_state_dict(SlabDenoiser(slab_size=1, separations=(1,), **TINY).state_dict(), deep)


def test_torch_jit_trace_with_the_three_inputs_matches_eager(tmp_path) -> None:
    """The export path the model card documents: ``torch.jit.trace`` over (x_t, t, separation)."""
    torch.manual_seed(0)
    net = SlabDenoiser(slab_size=3, **TINY).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    example = (torch.randn(2, 3, 16, 16), torch.tensor([500, 20]), torch.tensor([1, 3]))
    traced = torch.jit.trace(net, example)
    traced.save(str(tmp_path / "denoiser.ts"))
    loaded = torch.jit.load(str(tmp_path / "denoiser.ts"))
    other = (torch.randn(3, 3, 24, 32), torch.tensor([999, 1, 300]), torch.tensor([2, 2, 1]))  # other batch and size
    with torch.no_grad():
        for inputs in (example, other):
            torch.testing.assert_close(loaded(*inputs), net(*inputs), rtol=0, atol=1e-6)
