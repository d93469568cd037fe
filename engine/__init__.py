"""The engine: data, training, evaluation, generation, merging, artifacts, base models and the
pre-flight plan. Plain dataclasses and callbacks in, files out: it imports no Django, Celery or
boto3, so it is tested directly and usable from a notebook. The hyperparameter
schema, the plan, the data checks and chat_tokenizer import no torch: the web uses them."""
