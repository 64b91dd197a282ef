"""The slab denoiser: shapes for every slab size, the separation label, and checkpoint loading."""

from __future__ import annotations

import pytest
import torch

from bundle.networks import SlabDenoiser, load_weights

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
