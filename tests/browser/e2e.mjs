// End-to-end tests of the web UI in Debian's headless chromium, driven by playwright-core.
//
// Starts `target/debug/lookout serve` with the tiny fixture model on 127.0.0.1 and, in a real
// browser against the UI the binary embeds:
//   1. uploads a clip (progress bar), watches it replay and tokens stream into the window card;
//   2. publishes chromium's fake camera (a Y4M file) over WHIP and watches tokens stream;
//      changes the prompt mid-stream, then stops;
//   3. watches GStreamer's RTSP server (tools/rtsp_server.py) through the RTSP tab;
//   4. creates a monitor (a clip looped as a camera), sees its tokens stream on its card, opens its
//      history, searches it, and deletes it;
//   5. makes a monitor with an alert rule in the form, sees the ALERT badge and the incident with
//      its evidence clip playing;
//   6. gets a clear error for a camera that is not there.
// Screenshots go to target/browser-artifacts/. Run by scripts/test.sh (after the binary is built).

import { chromium } from "playwright-core";
import { spawn, execFileSync } from "node:child_process";
import { mkdirSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import net from "node:net";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const artifacts = join(root, "target/browser-artifacts");
mkdirSync(artifacts, { recursive: true });
const work = mkdtempSync(join(tmpdir(), "lookout-e2e-"));
const clip = join(root, "fixtures/preprocess/clips/vp9_25fps_320x240.webm");
const children = [];
const results = [];

function cleanup() {
  for (const c of children) {
    try { c.kill("SIGKILL"); } catch {}
  }
  rmSync(work, { recursive: true, force: true });
}

function freePort() {
  return new Promise((res) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => { const p = s.address().port; s.close(() => res(p)); });
  });
}

function waitForLine(child, re, what, ms = 60000) {
  return new Promise((res, rej) => {
    let buf = "";
    const t = setTimeout(() => rej(new Error(`${what}: nothing matching ${re} within ${ms} ms:\n${buf}`)), ms);
    const on = (d) => {
      buf += d.toString();
      const m = buf.match(re);
      if (m) { clearTimeout(t); res(m); }
    };
    child.stdout?.on("data", on);
    child.stderr?.on("data", on);
    child.on("exit", (code) => { clearTimeout(t); rej(new Error(`${what} exited with ${code}:\n${buf}`)); });
  });
}

let servers = 0;
async function startLookout(model = join(root, "fixtures/models/tiny-tied")) {
  const bin = join(root, "target/debug/lookout");
  // Each server its own data directory (its own store).
  const data = join(work, `data-${servers++}`);
  const c = spawn(bin, ["serve", "--model", model, "--port", "0",
    "--data-dir", data], { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, RUST_LOG: "warn" } });
  children.push(c);
  // Up to the end of the line: output may arrive in pieces, mid-port.
  const m = await waitForLine(c, /listening on (http:\/\/[0-9.:]+)\r?\n/, "lookout serve");
  return m[1];
}

async function startRtsp() {
  const port = await freePort();
  const c = spawn("/usr/bin/python3", [join(root, "tools/rtsp_server.py"), "--port", String(port)],
    { stdio: ["ignore", "pipe", "pipe"] });
  children.push(c);
  await waitForLine(c, /READY/, "RTSP server", 20000);
  return `rtsp://127.0.0.1:${port}/h264`;
}

async function settings(page, { window = "1", fps = "2", maxPixels = "16384", maxTokens = "6" } = {}) {
  await page.fill("#window-s", window);
  await page.fill("#stride-s", window);
  await page.fill("#fps", fps);
  await page.fill("#max-pixels", maxPixels);
  await page.fill("#max-tokens", maxTokens);
}

async function waitTokens(page, what) {
  await page.waitForFunction(() => (document.querySelector("#tokens")?.textContent ?? "").length > 0,
    null, { timeout: 90000 }).catch(async (e) => {
    await page.screenshot({ path: join(artifacts, `${what}-failed.png`), fullPage: true });
    const err = await page.textContent("#error").catch(() => null);
    throw new Error(`${what}: no tokens in the page (${err ?? e.message})`);
  });
  // A finished window on the timeline, with its timings.
  await page.waitForFunction(() => [...document.querySelectorAll("#timeline .timing")]
    .some((t) => t.textContent.includes("tokens")), null, { timeout: 90000 });
}

async function test(name, fn) {
  const started = Date.now();
  try {
    await fn();
    results.push({ name, ok: true, ms: Date.now() - started });
    console.log(`ok   ${name} (${Date.now() - started} ms)`);
  } catch (e) {
    results.push({ name, ok: false });
    console.log(`FAIL ${name}: ${e.stack ?? e}`);
  }
}

async function main() {
  const y4m = join(work, "camera.y4m");
  execFileSync("ffmpeg", ["-v", "error", "-y", "-i", clip, "-t", "4", "-pix_fmt", "yuv420p", y4m]);
  const base = await startLookout();
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium",
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
      "--disable-component-update", "--disable-sync", "--use-fake-device-for-media-stream",
      "--use-fake-ui-for-media-stream", `--use-file-for-fake-video-capture=${y4m}`],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const consoleErrors = [];
  page.on("pageerror", (e) => consoleErrors.push(String(e)));

  await test("the page loads the wasm UI and shows the model, device and health", async () => {
    await page.goto(base);
    await page.waitForSelector("#health");
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready", null, { timeout: 30000 });
    const model = await page.textContent("#model");
    const device = await page.textContent("#device");
    if (!model.includes("tiny-tied") || device !== "cpu") throw new Error(`model ${model}, device ${device}`);
  });

  await test("upload a clip: progress, replay in step, tokens stream into the window card", async () => {
    await page.click("#tab-upload");
    await page.setInputFiles("#file", clip);
    await settings(page);
    await page.fill("#prompt", "What is in the clip?");
    await page.evaluate(() => { window.__v = document.querySelector("#preview"); });
    await page.click("#start");
    await page.waitForSelector("#upload-progress", { timeout: 10000 });
    // While the replay runs, the clip plays along.
    await page.waitForFunction(() => document.querySelector("#phase")?.textContent === "live", null, { timeout: 30000 });
    await page.waitForFunction(() => document.querySelector("#preview").currentTime > 0.2, null, { timeout: 10000 })
      .catch(() => {});
    await waitTokens(page, "upload");
    const v = await page.evaluate(() => {
      const v = document.querySelector("#preview");
      return { same: v === window.__v, t: v.currentTime, src: v.src, ready: v.readyState, paused: v.paused, err: v.error?.message, can: v.canPlayType("video/webm; codecs=vp9") };
    });
    if (!(v.t > 0)) {
      const p = await page.evaluate(() => document.querySelector("#preview").play().then(() => "ok").catch((e) => e.message));
      throw new Error(`the clip is not playing: ${JSON.stringify(v)} play: ${p}`);
    }
    const info = await page.textContent("#source-info");
    if (!info.includes("vp9 320×240")) throw new Error(`source ${info}`);
    await page.screenshot({ path: join(artifacts, "upload.png"), fullPage: true });
    await page.waitForFunction(() => (document.querySelector("#phase")?.textContent ?? "").startsWith("ended"),
      null, { timeout: 60000 });
  });

  await test("publish the browser camera over WHIP: tokens stream; the prompt changes mid-stream; stop", async () => {
    await page.reload();
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready");
    await page.click("#tab-camera");
    await settings(page);
    await page.click("#start");
    await waitTokens(page, "camera");
    const info = await page.textContent("#source-info");
    if (!/vp8|h264/.test(info)) throw new Error(`source ${info}`);
    const fps = await page.textContent("#ingest");
    const preview = await page.evaluate(() => document.querySelector("#preview").srcObject !== null);
    if (!preview) throw new Error("the camera preview is not shown");
    await page.fill("#prompt", "Count the objects.");
    await page.click("#send-prompt");
    await page.waitForSelector("#notice");
    await page.screenshot({ path: join(artifacts, "camera.png"), fullPage: true });
    await page.click("#stop");
    await page.waitForFunction(() => (document.querySelector("#phase")?.textContent ?? "").includes("stopped"),
      null, { timeout: 30000 });
    console.log(`     camera: ${info}; ${fps}`);
  });

  await test("a stream published over WHIP by another sender is listed, chosen and analysed", async () => {
    // Another sender (as OBS would): a second page publishes the fake camera with plain WHIP.
    const sender = await context.newPage();
    await sender.goto(base + "/docs");
    const location = await sender.evaluate(async () => {
      const stream = await navigator.mediaDevices.getUserMedia({ video: true });
      const pc = new RTCPeerConnection();
      pc.addTransceiver(stream.getVideoTracks()[0], { direction: "sendonly" });
      await pc.setLocalDescription(await pc.createOffer());
      await new Promise((done) => {
        if (pc.iceGatheringState === "complete") done();
        pc.onicegatheringstatechange = () => pc.iceGatheringState === "complete" && done();
        setTimeout(done, 3000);
      });
      const r = await fetch("/v1/whip", { method: "POST", headers: { "Content-Type": "application/sdp" },
        body: pc.localDescription.sdp });
      if (r.status !== 201) throw new Error(`WHIP answered ${r.status}: ${await r.text()}`);
      await pc.setRemoteDescription({ type: "answer", sdp: await r.text() });
      window.__pc = pc;
      return r.headers.get("Location");
    });
    const id = location.split("/").pop();
    await page.reload();
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready");
    await page.click("#tab-webrtc");
    await page.click("#whip-refresh");
    await page.waitForSelector(`#whip-stream option[value="${id}"]`, { state: "attached", timeout: 10000 });
    await page.selectOption("#whip-stream", id);
    await settings(page);
    await page.click("#start");
    await waitTokens(page, "webrtc");
    await page.waitForFunction(() => (document.querySelector("#server-preview")?.naturalWidth ?? 0) > 0, null,
      { timeout: 15000 });
    await page.screenshot({ path: join(artifacts, "webrtc.png"), fullPage: true });
    // The sender ends the stream: the session ends with it.
    await sender.evaluate(async (loc) => { await fetch(loc, { method: "DELETE" }); window.__pc.close(); }, location);
    await page.waitForFunction(() => (document.querySelector("#phase")?.textContent ?? "").includes("end of stream"),
      null, { timeout: 30000 });
    await sender.close();
  });

  await test("watch an RTSP camera (GStreamer's RTSP server)", async () => {
    const url = await startRtsp();
    await page.reload();
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready");
    await page.click("#tab-rtsp");
    await page.fill("#rtsp-url", url);
    await settings(page);
    await page.click("#start");
    await waitTokens(page, "rtsp");
    // The live view shows the server's newest frame of the camera.
    await page.waitForFunction(() => (document.querySelector("#server-preview")?.naturalWidth ?? 0) === 640, null,
      { timeout: 15000 });
    await page.screenshot({ path: join(artifacts, "rtsp.png"), fullPage: true });
    // Restart: the session ends and a new one starts on the same source.
    const before = (await page.textContent("#source-info")).split(" ")[0];
    await page.click("#restart");
    await page.waitForFunction((b) => {
      const s = document.querySelector("#source-info")?.textContent ?? "";
      return s.length > 0 && !s.startsWith(b + " ");
    }, before, { timeout: 30000 });
    await waitTokens(page, "rtsp-restart");
    await page.click("#stop");
  });

  await test("monitors: create one, tokens on its card, its history, search, delete", async () => {
    await page.reload();
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready");
    await page.click("#nav-monitors");
    await page.click("#new-monitor");
    await page.fill("#monitor-name", "front door");
    await page.selectOption("#monitor-source-kind", "upload");
    await page.setInputFiles("#monitor-file", clip);
    await page.fill("#monitor-prompt", "Is anyone at the door?");
    await page.fill("#monitor-window", "1");
    await page.fill("#monitor-fps", "2");
    await page.fill("#monitor-max-tokens", "4");
    await page.click("#monitor-save");
    await page.waitForSelector(".monitor-card", { timeout: 30000 });
    const name = await page.textContent(".monitor-card .name");
    if (name !== "front door") throw new Error(`card says ${name}`);
    // Tokens stream into the card as the monitor answers (seen by a DOM observer), and the last
    // answer is kept.
    await page.evaluate(() => {
      window.__streamed = "";
      const watch = () => {
        const t = document.querySelector(".monitor-card .tokens");
        if (!t) return setTimeout(watch, 20);
        new MutationObserver(() => { if (t.textContent) window.__streamed = t.textContent; })
          .observe(t, { childList: true, characterData: true, subtree: true });
      };
      watch();
    });
    await page.waitForFunction(() => window.__streamed.length > 0, null, { timeout: 90000 });
    await page.waitForFunction(() => !(document.querySelector(".monitor-card .last")?.textContent ?? "").includes("none yet"),
      null, { timeout: 90000 });
    await page.waitForFunction(() => (document.querySelector(".monitor-card .state")?.textContent ?? "") === "running",
      null, { timeout: 30000 });
    await page.screenshot({ path: join(artifacts, "monitors.png"), fullPage: true });
    // Its history: events with thumbnails; a search for a word of one answer finds only answers
    // with that word.
    await page.waitForFunction(() => /[1-9]/.test(document.querySelector(".monitor-card .counters")?.textContent ?? ""),
      null, { timeout: 30000 });
    await page.click(".monitor-card .open");
    await page.waitForSelector("#history .event", { timeout: 30000 });
    const first = await page.textContent("#history .event .text");
    const word = (first.match(/[A-Za-z0-9]{3,}/) ?? [first.trim()])[0];
    await page.fill("#history-search", word);
    await page.click("#history-go");
    await page.waitForFunction((w) => {
      const texts = [...document.querySelectorAll("#history .event .text")].map((e) => e.textContent.toLowerCase());
      return texts.length > 0 && texts.every((t) => t.includes(w.toLowerCase()));
    }, word, { timeout: 30000 });
    const thumbs = await page.$$eval("#history .event img.thumb", (imgs) => imgs.filter((i) => i.naturalWidth > 0).length);
    await page.screenshot({ path: join(artifacts, "monitor-history.png"), fullPage: true });
    await page.fill("#history-search", "zzqqxxjj");
    await page.click("#history-go");
    await page.waitForSelector("#history-empty", { timeout: 30000 });
    if (thumbs < 1) throw new Error("no thumbnail loaded in the history");
    // Delete: the card goes.
    await page.click(".monitor-card .delete");
    await page.waitForSelector("#no-monitors", { timeout: 30000 });
  });

  await test("alerts: a rule made in the form fires, the card shows ALERT, the incident's clip plays", async () => {
    await page.goto(base);
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready");
    await page.click("#nav-monitors");
    await page.click("#new-monitor");
    await page.fill("#monitor-name", "porch");
    await page.selectOption("#monitor-source-kind", "upload");
    await page.setInputFiles("#monitor-file", clip);
    await page.fill("#monitor-prompt", "Is anyone on the porch?");
    await page.fill("#monitor-window", "1");
    await page.fill("#monitor-fps", "2");
    await page.fill("#monitor-max-tokens", "4");
    // One option fixes the tiny model's answer, so the rule fires on every window.
    await page.fill("#monitor-choices", "yes");
    await page.fill("#monitor-alert-when", "yes");
    await page.fill("#monitor-confirm-n", "2");
    await page.fill("#monitor-confirm-m", "3");
    await page.click("#monitor-save");
    await page.waitForSelector(".monitor-card .alert-badge", { timeout: 60000 });
    // The evidence clip (cut from the upload once the opening window ended) plays in the list.
    await page.waitForSelector("#incidents .incident video.evidence-clip", { timeout: 30000 });
    await page.waitForFunction(() => [...document.querySelectorAll("#incidents video.evidence-clip")]
      .some((v) => v.readyState >= 2 && v.duration > 0 && v.videoWidth > 0), null, { timeout: 30000 });
    const incident = await page.textContent("#incidents .incident");
    if (!incident.includes("porch") || !incident.includes("open") || !incident.includes("yes")) throw new Error(incident);
    await page.screenshot({ path: join(artifacts, "alerts.png"), fullPage: true });
    // The form shows the rule back when editing.
    await page.click(".monitor-card .edit");
    const when = await page.inputValue("#monitor-alert-when");
    const choices = await page.inputValue("#monitor-choices");
    if (when !== "yes" || choices !== "yes") throw new Error(`the form shows ${when} / ${choices}`);
    await page.click("#monitor-form button:not(#monitor-save)");
    await page.click(".monitor-card .delete");
    await page.waitForSelector("#no-monitors", { timeout: 30000 });
  });

  await test("a camera that is not there gets a clear error that says what to do", async () => {
    await page.goto(base);
    await page.reload();
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "ready");
    await page.click("#tab-rtsp");
    const port = await freePort();
    await page.fill("#rtsp-url", `rtsp://127.0.0.1:${port}/nothing`);
    await page.click("#start");
    await page.waitForSelector("#error", { timeout: 30000 });
    const text = await page.textContent("#error");
    if (!text.includes("no RTSP server answered") || !text.includes("reachable")) throw new Error(text);
    await page.screenshot({ path: join(artifacts, "error.png"), fullPage: true });
  });

  await test("a model that fails to load is shown as failed, with why", async () => {
    const broken = await startLookout(join(work, "no-such-model"));
    await page.goto(broken);
    await page.waitForFunction(() => document.querySelector("#health")?.textContent === "model failed", null,
      { timeout: 30000 }).catch(async (e) => {
      await page.screenshot({ path: join(artifacts, "model-failed-failed.png"), fullPage: true });
      throw new Error(`${e.message}: health says ${await page.textContent("#health").catch(() => "nothing")}`);
    });
    const why = await page.textContent(".health-error");
    if (!why.includes("no-such-model")) throw new Error(why);
    await page.screenshot({ path: join(artifacts, "model-failed.png"), fullPage: true });
  });

  if (consoleErrors.length) {
    results.push({ name: "no page errors", ok: false });
    console.log(`FAIL page errors: ${consoleErrors.join("\n")}`);
  }
  await browser.close();
}

try {
  await main();
} catch (e) {
  console.log(`FAIL setup: ${e.stack ?? e}`);
  results.push({ name: "setup", ok: false });
} finally {
  cleanup();
}
const failed = results.filter((r) => !r.ok);
console.log(`browser tests: ${results.length - failed.length} passed, ${failed.length} failed; screenshots in ${artifacts}`);
process.exit(failed.length ? 1 : 0);
