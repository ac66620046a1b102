"""Shared fixtures: no hub access, tiny text encoders built locally, realistic BatchNorm statistics."""
import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# 99 lower-case words + BERT's special tokens: enough for a tokenizer that really splits captions.
SMALL_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [
    w for w in ("a an the of in on with and or to stream game gaming call duty fps shooter live irl chat "
                "music "
                "cooking travel news sports fight fighting weapon gun blood police crowd street night camera "
                "mobile phone pc console streamer history strikes clean reported title category device "
                "viewers just chatting art painting dog cat walk city park car race kitchen recipe beach "
                "mountain tour concert dance piano guitar talk show podcast review unboxing tech build craft "
                "morning evening friends family fun chill relax study quiet loud violent safe real fake "
                "scene red blue green box").split()]


@pytest.fixture
def small_tmpfs(tmp_path):
    """`small_tmpfs(size)`: a folder on a tmpfs of `size` (e.g. "2m"), unmounted after the test: a full disk
    without filling the machine's. Skips where this process cannot mount one."""
    mounted = []

    def mount(size: str):
        folder = tmp_path / "small"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:100]})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def free_port() -> int:
    """A port free now, for a test's own server or rendezvous (nothing holds it until the caller binds)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_bert(directory, hidden: int, heads: int):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(SMALL_VOCAB) + "\n")
    BertTokenizerFast(vocab_file=str(directory / "vocab.txt"), do_lower_case=True).save_pretrained(directory)
    config = BertConfig(vocab_size=len(SMALL_VOCAB), hidden_size=hidden, num_hidden_layers=1,
                        num_attention_heads=heads, intermediate_size=64, max_position_embeddings=160)
    torch.manual_seed(0)
    BertModel(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="session")
def bert768(tmp_path_factory):
    """A random-init one-layer BERT with DistilBERT's hidden size (768) and a small vocabulary."""
    return _tiny_bert(tmp_path_factory.mktemp("bert768"), hidden=768, heads=12)


@pytest.fixture(scope="session")
def bert32(tmp_path_factory):
    """A random-init BERT small enough for multi-process training tests."""
    return _tiny_bert(tmp_path_factory.mktemp("bert32"), hidden=32, heads=2)


def calibrate_batchnorm(model: torch.nn.Module, image_size: int, batches: int = 2) -> None:
    """Give BatchNorm running statistics of real-looking inputs (random init leaves logits near 1e7)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.rand(16, 3, image_size, image_size, generator=generator) * 4 - 2)
    for m in norms:
        m.momentum = 0.1
    model.eval()


@pytest.fixture
def sbatch_script(monkeypatch):
    """Renders the sbatch script of a submitit executor made in the test, on a machine without Slurm: submitit
    picks its Slurm executor only where it finds srun, so the test says it does. Nothing is submitted."""
    import submitit

    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))

    def render(executor) -> str:
        assert executor.cluster == "slurm"
        return executor._executor._make_submission_file_text("python -u job.py", "0")

    return render
