from kfp.dsl import Dataset, Input, Markdown, Output


def clean(raw: Input[Dataset], resize_wrong_size: bool, cleaned: Output[Dataset], quarantine: Output[Dataset],
          repairs: Output[Dataset], summary: Output[Markdown]):
    """Decode every image; unusable ones go to ``quarantine`` (id, path, reason, detail),
    kept ones that were converted to grayscale or resized are listed in ``repairs``."""
    from kiln.clean import CleanConfig, run_clean

    report = run_clean(raw.path, cleaned.path, quarantine.path, CleanConfig(resize_wrong_size=resize_wrong_size),
                       summary_path=summary.path, repairs_path=repairs.path)
    cleaned.metadata.update({"rows": report.n_clean, "data_version": raw.metadata.get("data_version", "")})
    quarantine.metadata.update({"rows": report.n_quarantined, **report.by_reason})
    repairs.metadata.update({"rows": len(report.repairs), "grayscale": report.converted, "resized": report.resized})
