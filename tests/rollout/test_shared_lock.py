"""The rollout engine lock: requests hold it shared (several in flight at once), a weight update alone,
and a waiting update keeps new requests out until it is done."""

import threading

from gkd.rollout.versioned import SharedLock

WAIT_S = 20


def test_shared_holders_overlap_and_an_update_waits_for_them_and_holds_new_ones_back():
    lock, order = SharedLock(), []
    together = threading.Barrier(2, timeout=WAIT_S)  # breaks unless both requests hold the lock at once
    release = threading.Event()

    def request(name):
        with lock.shared():
            together.wait()
            order.append(f"{name} in")
            assert release.wait(WAIT_S)
            order.append(f"{name} out")

    def update():
        with lock:
            order.append("update")

    requests = [threading.Thread(target=request, args=(n,)) for n in ("a", "b")]
    for t in requests:
        t.start()
    while len(order) < 2:
        threading.Event().wait(0.01)
    updater = threading.Thread(target=update)
    updater.start()
    while lock._waiting == 0:
        threading.Event().wait(0.01)
    late = threading.Thread(target=lambda: lock.shared().__enter__() and order.append("late in"))
    late.start()
    threading.Event().wait(0.2)
    assert "late in" not in order and "update" not in order  # the update waits; the late request too
    release.set()
    for t in (*requests, updater, late):
        t.join(WAIT_S)
        assert not t.is_alive()
    assert order[-2:] == ["update", "late in"]
