"""Task modules of the perception models (``tip``, ``sr``, ``defects``), one per model.

Each provides ``add_train_arguments(parser)``, ``train(args) -> int``,
``add_evaluate_arguments(parser)``, ``evaluate(args) -> int`` and
``infer(image, pixel_size_nm) -> dict``; ``agent.cli_perception`` dispatches to them.
"""
