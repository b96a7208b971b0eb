"""Vision-language models: reading and preprocessing images (image), and LLaVA model directories in
Hugging Face's `llava` format (checkpoint). The model itself is in model/vision.py and model/llava.py."""
