"""The ZeroMQ floor: the same four hops as an embedq round trip, with no work at any of them.

A bare ROUTER broker process forwards each client message to one DEALER echo worker process
and the echo back to the client, acknowledging the submit on the way (as embedq's ACK); no
store, no headers, no task. Measured beside PPE in the same run, it shows what the wire alone
costs on this machine: the part of embedq's round trip that faster Python cannot remove.
"""

import multiprocessing
import os
import tempfile

import zmq

#: Messages the throughput case keeps in flight (well under the sockets' high-water marks).
WINDOW = 1000


def _broker(front, back):
    context = zmq.Context()
    clients, workers = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    clients.bind(front)
    workers.bind(back)
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    poller.register(workers, zmq.POLLIN)
    worker = workers.recv_multipart()[0]  # its hello
    while True:
        ready = dict(poller.poll())
        if workers in ready:
            clients.send_multipart(workers.recv_multipart()[1:])
        if clients in ready:
            frames = clients.recv_multipart()
            workers.send_multipart([worker, *frames])
            clients.send_multipart([frames[0], b"ACK"])


def _echo(back):
    socket = zmq.Context().socket(zmq.DEALER)
    socket.connect(back)
    socket.send(b"hello")
    while True:
        socket.send_multipart(socket.recv_multipart())


class ZmqFloor:
    """Client side: ``trip()`` is one submit -> ACK -> echoed result; ``run(n)`` pipelines n."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="embedq-floor-")
        front, back = f"ipc://{self.dir}/front", f"ipc://{self.dir}/back"
        spawn = multiprocessing.get_context("spawn")
        self.processes = [spawn.Process(target=_broker, args=(front, back), daemon=True),
                          spawn.Process(target=_echo, args=(back,), daemon=True)]
        for process in self.processes:
            process.start()
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(front)

    def trip(self):
        self.socket.send_multipart([b"task", b"payload"])
        self.socket.recv_multipart()  # ACK
        self.socket.recv_multipart()  # the echo

    def run(self, n):
        sent = received = 0
        while received < 2 * n:  # an ACK and an echo per message
            while sent < n and sent - received // 2 < WINDOW:
                self.socket.send_multipart([b"task", b"payload"])
                sent += 1
            self.socket.recv_multipart()
            received += 1
        return n

    def close(self):
        self.socket.close()
        for process in self.processes:
            process.kill()
            process.join(5)
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))
        os.rmdir(self.dir)
