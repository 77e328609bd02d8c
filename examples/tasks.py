"""Tasks for the multi-process example (see examples/README.md)."""

import embedq

app = embedq.App("tasks", broker="tcp://127.0.0.1:5555")


@app.task
def add(x, y):
    return x + y


@app.task(bind=True)
def hello(self, name):
    return f"hello {name}, from task {self.request.id}"
