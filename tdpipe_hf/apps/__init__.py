"""Applications built on the engine: the ``tdpipe`` CLI, batch jobs, benchmarks, predictor
training, the in-process server and the Gradio demo. The core package never imports this one."""
