#!/usr/bin/python3
"""A real RTSP server for Lookout's tests and benchmarks: GStreamer's gst-rtsp-server (Debian
packages python3-gi, gir1.2-gst-rtsp-server-1.0, gstreamer1.0-plugins-{base,good,bad,ugly}).

Serves live test patterns on 127.0.0.1:

  /h264        H.264 (x264), 640x360 at 15 fps
  /h265        H.265 (x265), 640x360 at 15 fps
  /h264-720p   H.264, 1280x720 at 30 fps (the CPU-per-stream measurement)
  /h264-720p-busy  the same size and rate, a moving zone plate at 4 Mbit/s (detail everywhere)
  /h264-tcp-only   as /h264, but RTP over UDP is refused (461 Unsupported Transport), as
               live555-based cameras answer a transport they do not take

With --auth USER:PASSWORD every mount asks for those credentials.

Each client gets its own pipeline (a live source starts at a key frame); with --shared every
client of a mount shares one pipeline (many cameras' worth of clients on one encoder, for
benchmarks of the server side). Prints
"READY <port>" on stdout once listening. Run with Debian's Python (/usr/bin/python3): the gi
bindings are Debian packages.
"""

import argparse
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
gi.require_version("GstRtsp", "1.0")
from gi.repository import GLib, Gst, GstRtsp, GstRtspServer  # noqa: E402

SOURCE = "videotestsrc is-live=true pattern=ball ! video/x-raw,width={w},height={h},framerate={fps}/1 ! videoconvert"
H264 = "x264enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate=1500 ! rtph264pay name=pay0 pt=96 config-interval=-1"
H265 = "x265enc tune=zerolatency speed-preset=ultrafast key-int-max={gop} bitrate=1500 ! rtph265pay name=pay0 pt=96 config-interval=-1"


SHARED = False


def factory(launch):
    f = GstRtspServer.RTSPMediaFactory()
    f.set_launch("( " + launch + " )")
    f.set_shared(SHARED)
    return f


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=8554)
    ap.add_argument("--auth", help="USER:PASSWORD required on every mount (Basic)")
    ap.add_argument("--shared", action="store_true", help="one pipeline per mount for all its clients")
    args = ap.parse_args()
    global SHARED
    SHARED = args.shared
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    small = SOURCE.format(w=640, h=360, fps=15)
    mounts.add_factory("/h264", factory(small + " ! " + H264.format(gop=15)))
    mounts.add_factory("/h265", factory(small + " ! " + H265.format(gop=15)))
    tcp_only = factory(small + " ! " + H264.format(gop=15))
    tcp_only.set_protocols(GstRtsp.RTSPLowerTrans.TCP)
    mounts.add_factory("/h264-tcp-only", tcp_only)
    big = SOURCE.format(w=1280, h=720, fps=30)
    mounts.add_factory("/h264-720p", factory(big + " ! " + H264.format(gop=30)))
    # Fine moving detail everywhere (a zone plate) at 4 Mbit/s: closer to a busy real scene.
    busy = "videotestsrc is-live=true pattern=zone-plate kx2=20 ky2=20 kt=1 ! video/x-raw,width=1280,height=720,framerate=30/1 ! videoconvert"
    mounts.add_factory("/h264-720p-busy", factory(busy + " ! " + H264.format(gop=30).replace("bitrate=1500", "bitrate=4000")))

    if args.auth:
        # Every mount asks for Basic credentials (without a default token, gst-rtsp-server
        # answers 401 with a challenge).
        user, password = args.auth.split(":", 1)
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(user, password), token)
        server.set_auth(auth)
        for path in ("/h264", "/h265", "/h264-tcp-only", "/h264-720p", "/h264-720p-busy"):
            perms = GstRtspServer.RTSPPermissions()
            perms.add_role("viewer")
            perms.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_ACCESS, True)
            perms.add_permission_for_role("viewer", GstRtspServer.RTSP_PERM_MEDIA_FACTORY_CONSTRUCT, True)
            mounts.match(path)[0].set_permissions(perms)

    if server.attach(None) == 0:
        print(f"cannot listen on 127.0.0.1:{args.port}", file=sys.stderr)
        sys.exit(1)
    print(f"READY {server.get_bound_port()}", flush=True)
    GLib.MainLoop().run()


if __name__ == "__main__":
    main()
