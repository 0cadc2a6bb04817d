"""Export trained models to other runtimes: `chatrl export --format gguf` (llama.cpp, ollama)."""
