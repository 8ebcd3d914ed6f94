"""
Errors a user can fix, and how every script shows them: one line that says what to do, never a traceback.
Importable without torch (configurator.py needs UserError before anything heavy loads).
"""
import os
import sys


class UserError(Exception):
    """Bad input a user can fix. Scripts print it as one line, without a traceback."""


def friendly_errors():
    """Make an uncaught UserError print `error: <message>` and exit with status 2 instead of a traceback;
    Ctrl-C exits quietly. Scripts call this first."""
    default_hook = sys.excepthook

    def hook(kind, value, tb):
        # sys.__stderr__: under torchrun, torch's own hook wraps this one with sys.stderr redirected to a
        # buffer it prints afterwards, which sys.exit would skip, losing the message
        if issubclass(kind, UserError):
            print(f"error: {value}", file=sys.__stderr__, flush=True)
            sys.exit(2)  # sys.exit inside the hook still sets the exit status
        elif lost_peer(value):
            first = str(value).strip().splitlines()[0][-200:]
            print(f"error: rank {os.environ.get('RANK')} lost contact with the other ranks ({first}): one died "
                  f"or hung; torchrun's summary names the first to fail. Resume with --init_from=resume",
                  file=sys.__stderr__, flush=True)
            sys.exit(1)
        elif out_of_memory(value):
            first = " ".join(str(value).split())[:160]
            print(f"error: out of memory ({first}); lower batch_size or block_size, or try "
                  f"gradient_checkpointing=True", file=sys.__stderr__, flush=True)
            sys.exit(1)
        elif issubclass(kind, KeyboardInterrupt):
            print("", file=sys.stderr)
            sys.exit(130)
        else:
            default_hook(kind, value, tb)

    sys.excepthook = hook



def lost_peer(error):
    """Whether an exception in a torchrun worker means another rank died (connection reset) or hung
    (a collective timed out), as gloo and nccl report it."""
    if int(os.environ.get("WORLD_SIZE", 1)) < 2 or not isinstance(error, RuntimeError):
        return False
    text, torch = str(error), sys.modules.get("torch")  # torch is loaded wherever ranks exist
    return isinstance(error, torch.distributed.DistError) or any(s in text for s in (
        "Connection reset by peer", "Connection closed by peer", "Timed out waiting", "timed out", "NCCL"))




def out_of_memory(error):
    """Whether an exception is the device (or the machine) running out of memory."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "can't allocate memory" in str(error)
