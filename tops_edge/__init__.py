"""tops-edge: LLaVA-class multimodal LLMs on NVIDIA edge devices, with visual-token pruning in the graphs."""

__version__ = "0.1.0"


def __getattr__(name):  # keep `import tops_edge` light: torch/onnxruntime load on first use
    if name == "Pipeline":
        from .runtime import Pipeline

        return Pipeline
    if name == "export_model":
        from .export import export_model

        return export_model
    raise AttributeError(name)
