// Browser scenarios against a running `jobwire up` (tests/test_web.py starts one and runs each
// scenario as `node web/tests/e2e.mjs SCENARIO`). Debian's Chromium, driven by playwright-core.
//
//   JOBWIRE_URL   the stack's Envoy, e.g. http://127.0.0.1:18080 (required)
//   SCREENSHOTS   folder for the screenshots of each state (default web/test-results)
//   CHROMIUM      the browser binary (default /usr/bin/chromium)

import { execFileSync } from "node:child_process";
import { mkdirSync, readFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const BASE = process.env.JOBWIRE_URL;
const SHOTS = process.env.SCREENSHOTS || join(dirname(fileURLToPath(import.meta.url)), "..", "test-results");
const BUSYBOX = "jobwire/busybox:latest";
const TOKEN = `${Date.now().toString(36)}${Math.random().toString(36).slice(2, 8)}`;

const scenarios = { run, drop, cancel, reload, views, longlog, metaframe, failures, build, keyboard, urlstate, dblclick, phone };
const AXE = join(dirname(fileURLToPath(import.meta.url)), "..", "node_modules", "axe-core", "axe.min.js");

function assert(condition, message) {
  if (!condition) throw new Error(`assertion failed: ${message}`);
}

function jobUrl(definition, extra = "") {
  const job = Buffer.from(JSON.stringify(definition)).toString("base64");
  return `${BASE}/#?queue=local&job=${encodeURIComponent(job)}${extra}`;
}

async function shot(page, name) {
  mkdirSync(SHOTS, { recursive: true });
  await page.waitForTimeout(150); // let xterm paint
  await page.screenshot({ path: join(SHOTS, `${name}.png`) });
  console.log(`screenshot ${join(SHOTS, `${name}.png`)}`);
}

const terminalText = (page) => page.evaluate(() => window.jobwire.terminalText());
const state = (page) => page.locator("#status").getAttribute("data-state");
const stateText = (page) => page.locator("#status .state-text").textContent();
const currentJobId = (page) => page.locator("a.job-id").getAttribute("data-id");

async function waitForText(page, text, timeout = 60_000) {
  await page.waitForFunction((t) => window.jobwire.terminalText().includes(t), text, { timeout });
}

async function waitForState(page, wanted, timeout = 60_000) {
  await page.waitForFunction((s) => document.querySelector("#status")?.dataset.state === s, wanted, { timeout });
}

// Cancel is its own control (shown while the job waits or runs); Run is `run` or `retry`.
async function clickAction(page, action) {
  const selector = action === "cancel" ? "#cancel:not([hidden])" : `#run[data-action='${action}']:not([disabled])`;
  await page.locator(selector).waitFor({ timeout: 20_000 });
  await page.locator(selector).click();
}

/** axe-core in the page: no serious or critical violation. */
async function axe(page, what) {
  if (!(await page.evaluate(() => "axe" in window))) await page.addScriptTag({ path: AXE });
  const results = await page.evaluate(() => window.axe.run(document, { resultTypes: ["violations"] }));
  const bad = results.violations.filter((v) => v.impact === "serious" || v.impact === "critical");
  const described = bad.map((v) => `${v.impact} ${v.id}: ${v.nodes.map((n) => `${n.target.join(" ")} (${n.failureSummary})`).join("; ")}`);
  assert(bad.length === 0, `axe on the ${what} page:\n${described.join("\n")}`);
  console.log(`axe ${what}: ${results.violations.length} minor finding(s), none serious or critical`);
}

const focused = (page) =>
  page.evaluate(() => {
    const el = document.activeElement;
    return el?.id ? `#${el.id}` : el?.getAttribute("name") ? `[name=${el.getAttribute("name")}]` : el?.closest(".terminal") ? "terminal" : el?.tagName.toLowerCase();
  });

function containers(jobId) {
  return execFileSync("docker", ["ps", "-a", "-q", "--filter", `label=io.jobwire.job=${jobId}`], { encoding: "utf8" }).trim();
}

// 1. Run from a URL: live logs, then outputs; a text output previews; a download returns its bytes.
async function run(page) {
  const png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";
  const command =
    `sh -c 'echo start-${TOKEN}; sleep 2; printf "\\033[32mgreen\\033[0m\\n"; echo oops >&2; ` +
    `echo hello-${TOKEN} > /outputs/hello.txt; seq 1 2000 > /outputs/numbers.txt; ` +
    `echo ${png} | base64 -d > /outputs/dot.png; echo end-${TOKEN}'`;
  await page.goto(jobUrl({ image: BUSYBOX, command }));
  await page.waitForFunction(() => document.querySelector("#status")?.dataset.state === "none");
  assert((await stateText(page)) === "Not run yet", "a new job is not run yet");
  await shot(page, "1-ready");
  await clickAction(page, "run");
  await waitForText(page, `start-${TOKEN}`);
  assert((await state(page)) === "running", `live logs while running (state ${await state(page)})`);
  assert(!(await terminalText(page)).includes(`end-${TOKEN}`), "logs arrive before the job ends");
  await shot(page, "2-running");
  await waitForState(page, "finished");
  await waitForText(page, `end-${TOKEN}`);
  const text = await terminalText(page);
  assert(text.includes("green") && text.includes("oops"), "stdout and stderr both shown");
  // stdout and stderr in one sequence, in the order Docker delivered them (the stored log's order;
  // the engine copies the two pipes in a goroutine each, so that is not always the program's).
  const stored = await (await fetch(`${BASE}/j/${await currentJobId(page)}/run-logs.json`)).json();
  const delivered = stored.chunks.map((c) => c.text).join("");
  assert(text.includes(delivered), `the terminal shows the stored order: ${JSON.stringify(delivered)} in ${JSON.stringify(text)}`);
  assert((await stateText(page)) === "Finished", `finished cleanly: ${await stateText(page)}`);
  const detail = await page.locator("#status .state-detail").textContent();
  assert(detail.includes("exit code 0"), `exit code in words: ${detail}`);
  // The outputs panel opens by itself; the text output previews.
  await page.locator(".outputs-list li[data-name='hello.txt']").waitFor();
  await page.locator(".text-preview").filter({ hasText: `hello-${TOKEN}` }).waitFor();
  const size = await page.locator(".outputs-list li[data-name='hello.txt'] .size").textContent();
  assert(size === `${`hello-${TOKEN}\n`.length} B`, `size shown: ${size}`);
  await shot(page, "3-finished-outputs");
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.locator(".outputs-list li[data-name='hello.txt'] button.download").click(),
  ]);
  assert(download.suggestedFilename() === "hello.txt", `download name ${download.suggestedFilename()}`);
  const bytes = readFileSync(await download.path(), "utf8");
  assert(bytes === `hello-${TOKEN}\n`, `downloaded bytes: ${JSON.stringify(bytes)}`);
  // Copy logs fetches the stored logs (all of them, not just what the terminal kept).
  await page.locator("select[name='copy-mode']").selectOption("stderr");
  await page.locator(".copy button").click();
  await page.locator(".copy button").filter({ hasText: "Copied" }).waitFor();
  assert((await page.evaluate(() => navigator.clipboard.readText())) === "oops\n", "copied stderr");
  // A larger output is stored on the server (a `key` ref): fetched through /j/{id}/outputs/….
  const numbers = page.locator(".outputs-list li[data-name='numbers.txt']");
  assert((await numbers.locator(".size").textContent()) === "8.7 KiB", "size of a stored output");
  const [big] = await Promise.all([page.waitForEvent("download"), numbers.locator("button.download").click()]);
  const got = readFileSync(await big.path(), "utf8");
  assert(got.length === 8893 && got.startsWith("1\n2\n") && got.endsWith("2000\n"), "stored output downloads whole");
  // An image output previews as an image.
  await page.locator(".outputs-list li[data-name='dot.png'] button.link").click();
  await page.waitForFunction(() => document.querySelector(".preview img")?.naturalWidth === 1);
  await shot(page, "3b-image-preview");
  const [zip] = await Promise.all([page.waitForEvent("download"), page.locator("button.download-all").click()]);
  assert(readFileSync(await zip.path()).subarray(0, 2).toString() === "PK", "download all is a zip");
  // The same job id as the server computes (client-side hash matches the server's).
  const jobId = await currentJobId(page);
  const response = await fetch(`${BASE}/j/${jobId}/result.json`);
  assert(response.ok, `server knows job ${jobId}`);
}

// 2. A dropped file is uploaded by hash and visible to the job at /inputs/<name>.
async function drop(page) {
  const command = `sh -c 'echo listing-${TOKEN}; ls /inputs; cat /inputs/data.txt /inputs/note.txt'`;
  await page.goto(jobUrl({ image: BUSYBOX, command }));
  await page.locator("nav.tabs button[data-tab='inputs']").click();
  // A small text input, edited in place (kept in the URL's `inputs` parameter).
  await page.locator("input[name='text.new']").fill("note.txt");
  await page.locator("input[name='text.new']").press("Enter");
  await page.locator("textarea[name='text.note.txt']").fill(`typed-${TOKEN}`); // no newline: a partial last line
  const content = `dropped-${TOKEN} 🚀\n`;
  const transfer = await page.evaluateHandle((text) => {
    const data = new DataTransfer();
    data.items.add(new File([text], "data.txt", { type: "text/plain" }));
    return data;
  }, content);
  await page.dispatchEvent(".dropzone", "dragover", { dataTransfer: transfer });
  await page.dispatchEvent(".dropzone", "drop", { dataTransfer: transfer });
  await page.locator("ul.files li").filter({ hasText: "data.txt" }).waitFor();
  await page.locator(".upload-status").filter({ hasText: "Added data.txt" }).waitFor();
  await shot(page, "4-inputs-dropped");
  await clickAction(page, "run");
  await waitForState(page, "finished");
  await waitForText(page, `dropped-${TOKEN}`);
  await waitForText(page, `typed-${TOKEN}`);
  await shot(page, "5-input-seen-by-job");
  const url = page.url();
  const job = JSON.parse(Buffer.from(decodeURIComponent(new URL(url).hash.match(/job=([^&]+)/)[1]), "base64").toString());
  assert(job.inputs?.["data.txt"]?.type === "key", `the URL carries the input: ${JSON.stringify(job)}`);
  assert(new URL(url).hash.includes("inputs="), "the URL carries the text file");
  // The URL alone reproduces the job: a fresh page shows the same finished job.
  const again = await page.context().newPage();
  await again.goto(url);
  await waitForState(again, "finished");
  assert((await currentJobId(again)) === (await currentJobId(page)), "the URL is the job");
  await again.close();
}

// 3. Cancel on a long job: finished as cancelled, and its container is gone.
async function cancel(page) {
  await page.goto(jobUrl({ image: BUSYBOX, command: `sh -c 'echo long-${TOKEN}; sleep 300'` }));
  await clickAction(page, "run");
  await waitForText(page, `long-${TOKEN}`);
  const jobId = await currentJobId(page);
  assert(containers(jobId) !== "", "the job's container runs");
  await clickAction(page, "cancel");
  await waitForState(page, "finished", 30_000);
  assert((await stateText(page)) === "Cancelled", `cancelled: ${await stateText(page)}`);
  const deadline = Date.now() + 15_000;
  while (containers(jobId) !== "" && Date.now() < deadline) await page.waitForTimeout(250);
  assert(containers(jobId) === "", "the container is gone");
  await shot(page, "6-cancelled");
}

// 4. `/j/<id>` shows a finished job with its logs, and still does after a reload.
async function reload(page) {
  const definition = { image: BUSYBOX, command: `sh -c 'echo reloaded-${TOKEN}; echo 42 > /outputs/answer.txt'` };
  const submitted = await fetch(`${BASE}/q/local`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ definition }),
  });
  assert(submitted.ok, `submit over REST: ${submitted.status}`);
  const { jobId } = await submitted.json();
  for (let i = 0; i < 120; i++) {
    const result = await (await fetch(`${BASE}/j/${jobId}/result.json`)).json();
    if (result.state === "JOB_STATE_FINISHED") break;
    await page.waitForTimeout(250);
  }
  await page.goto(`${BASE}/j/${jobId}`);
  await waitForState(page, "finished");
  await waitForText(page, `reloaded-${TOKEN}`);
  await page.reload();
  await waitForState(page, "finished");
  await waitForText(page, `reloaded-${TOKEN}`);
  assert(new URL(page.url()).pathname === `/j/${jobId}`, "the short URL is kept until an edit");
  assert((await currentJobId(page)) === jobId, "the page's job id is the server's");
  await page.locator(".outputs-list li[data-name='answer.txt']").waitFor();
  await shot(page, "7-job-page-after-reload");
  // The REST route on the same path still answers JSON to non-browsers.
  const json = await (await fetch(`${BASE}/j/${jobId}`)).json();
  assert(json.job.id === jobId, "GET /j/{id} without Accept: text/html is the REST JSON");
}

// 5. The other main views: the job editor, the queue panel, a phone-sized screen.
async function views(page) {
  await page.goto(jobUrl({ image: BUSYBOX, command: `echo views-${TOKEN}`, env: { GREETING: "hi" } }, "&NAME=world"));
  await page.locator("input[name='command']").waitFor();
  await shot(page, "8-job-editor");
  // Typing edits the URL (debounced), and the id follows the definition.
  const before = await currentJobId(page);
  const calls = [];
  const count = (request) => request.url().includes("/jobwire.v1.") && calls.push(request.url());
  page.on("request", count);
  await page.locator("input[name='command']").fill("");
  await page.locator("input[name='command']").pressSequentially(`echo edited-${TOKEN}`, { delay: 20 });
  await page.waitForFunction((b) => document.querySelector("a.job-id")?.dataset.id !== b, before, { timeout: 5000 });
  await page.waitForFunction(() => location.hash.includes("job="));
  await page.waitForTimeout(600);
  page.off("request", count);
  assert(calls.length <= 3, `no request per keystroke (${calls.length} for ${`echo edited-${TOKEN}`.length} keys): ${calls.map((c) => c.split("/").pop()).join(", ")}`);
  const job = JSON.parse(Buffer.from(decodeURIComponent(new URL(page.url()).hash.match(/job=([^&]+)/)[1]), "base64").toString());
  assert(job.command === `echo edited-${TOKEN}`, "the URL carries the edit");
  await page.locator("nav.tabs button[data-tab='queue']").click();
  await page.locator(".queue table").first().waitFor();
  await shot(page, "9-queue");
  // A queue nobody serves: queued, and the page says why.
  await page.locator("nav.tabs button[data-tab='job']").click();
  await page.locator("input[name='command']").fill(`echo waiting-${TOKEN}`);
  await page.locator("#queue").fill(`nobody-${TOKEN}`);
  await page.locator("#queue").press("Enter");
  await clickAction(page, "run");
  await waitForState(page, "queued");
  await page.locator("#status .state-detail").filter({ hasText: "no worker" }).waitFor({ timeout: 10_000 });
  await shot(page, "12-queued-waiting-reason");
  // The queue's rows show image and command; a row's Cancel (for everyone) asks first.
  await page.locator("nav.tabs button[data-tab='queue']").click();
  const row = page.locator(".queue tbody tr").filter({ hasText: `waiting-${TOKEN}` });
  await row.locator("td.what").filter({ hasText: BUSYBOX }).waitFor({ timeout: 10_000 });
  await row.getByRole("button", { name: /Cancel job .* for everyone/ }).click();
  const dialog = page.getByRole("dialog", { name: "Cancel this job for everyone?" });
  await dialog.waitFor();
  assert((await focused(page)) === "button", "the dialog takes the focus");
  await axe(page, "cancel-confirmation");
  await shot(page, "12b-cancel-for-everyone-asks");
  await page.keyboard.press("Escape"); // keeps the job
  await dialog.waitFor({ state: "hidden" });
  await page.waitForTimeout(300);
  assert((await state(page)) === "queued", "Escape keeps the job");
  await row.getByRole("button", { name: /Cancel job .* for everyone/ }).click();
  await dialog.getByRole("button", { name: "Cancel for everyone" }).click();
  await waitForState(page, "finished");
  assert((await stateText(page)) === "Cancelled", `cancelled from the queue: ${await stateText(page)}`);
  await page.locator("nav.tabs button[data-tab='job']").click();
  await page.locator("input[name='command']").fill(`echo edited-${TOKEN}`);
  await page.locator("#queue").fill("local");
  await page.locator("#queue").press("Enter");
  await page.setViewportSize({ width: 390, height: 844 });
  await page.locator("nav.tabs button[data-tab='terminal']").click();
  await clickAction(page, "run");
  await waitForState(page, "finished");
  await shot(page, "10-phone-terminal");
  await page.locator("nav.tabs button[data-tab='job']").click();
  await shot(page, "11-phone-job");
}

// A job that cannot start says why; a program that fails shows its exit code.
async function failures(page) {
  await page.goto(jobUrl({ image: `jobwire/missing-${TOKEN}:never`, command: "true" }));
  await clickAction(page, "run");
  await waitForState(page, "finished");
  assert((await stateText(page)) === "Failed", `an image that cannot be had fails: ${await stateText(page)}`);
  const why = await page.locator("#status .state-detail").textContent();
  assert(why.length > 10, `with a reason: ${why}`);
  await shot(page, "15-failed-missing-image");
  await page.goto(jobUrl({ image: BUSYBOX, command: `sh -c 'echo failing-${TOKEN} >&2; exit 3'` }));
  await clickAction(page, "run");
  await waitForState(page, "finished");
  assert((await stateText(page)) === "Finished with exit code 3", `exit code: ${await stateText(page)}`);
  await shot(page, "16-exit-code-3");
}

// Build mode: an inline Dockerfile is built on the worker; build logs, then the run's.
async function build(page) {
  await page.goto(jobUrl({ image: BUSYBOX, command: "true" }));
  await page.locator(".segmented button").filter({ hasText: "Build" }).click();
  await page.locator("textarea[name='build.dockerfile']").fill(`FROM ${BUSYBOX}\nRUN echo built-${TOKEN} > /built.txt\n`);
  await page.locator("input[name='command']").fill("cat /built.txt");
  await clickAction(page, "run");
  await waitForState(page, "finished", 120_000);
  await waitForText(page, `built-${TOKEN}`);
  assert((await stateText(page)) === "Finished", `the built image ran: ${await stateText(page)}`);
  const job = JSON.parse(Buffer.from(decodeURIComponent(new URL(page.url()).hash.match(/job=([^&]+)/)[1]), "base64").toString());
  assert(job.build?.dockerfile?.includes(`built-${TOKEN}`) && !job.image, `the URL carries the build: ${JSON.stringify(job)}`);
  await shot(page, "17-built-image-ran");
}

// The terminal keeps a bounded scrollback, whatever the job prints.
async function longlog(page) {
  await page.goto(jobUrl({ image: BUSYBOX, command: `sh -c 'seq 1 30000; echo done-${TOKEN}'` }));
  await clickAction(page, "run");
  await waitForState(page, "finished");
  await waitForText(page, `done-${TOKEN}`);
  const lines = await page.evaluate(() => window.jobwire.terminalLines());
  assert(lines <= 5000 + 100, `bounded scrollback: ${lines} lines kept`);
  // It says so, and links the whole log.
  const notice = page.locator(".dropped-notice");
  await notice.waitFor();
  const full = await notice.locator("a").getAttribute("href");
  const whole = await (await fetch(full)).text();
  assert(whole.startsWith("1\n2\n") && whole.includes(`\n30000\ndone-${TOKEN}`), `the full log link: ${full}`);
  await shot(page, "13-long-log");
}

// Embedded in a metapage: metaframe inputs become job inputs, outputs become metaframe outputs.
async function metaframe(page) {
  const here = dirname(fileURLToPath(import.meta.url));
  const library = readFileSync(join(here, "..", "node_modules", "@metapages", "metapage", "dist", "index.js"));
  const command = `sh -c 'cat /inputs/greeting.txt; tr a-z A-Z < /inputs/greeting.txt > /outputs/shout.txt'`;
  const frameUrl = jobUrl({ image: BUSYBOX, command });
  const host = `<!doctype html><body style="margin:0;background:#333">
    <p style="color:#ccc;font:13px sans-serif;margin:6px">a metapage embedding jobwire</p>
    <script type="module">
      import { Metapage } from "/metapage-test/metapage.js";
      window.outputs = {};
      const metapage = window.metapage = await Metapage.from({ version: "2", metaframes: { jobwire: { url: ${JSON.stringify(frameUrl)} } } });
      metapage.onOutputs((outputs) => Object.assign(window.outputs, outputs.jobwire || {}));
      const iframe = await metapage.getMetaframe("jobwire").iframe;
      iframe.style.cssText = "width:100%;height:700px;border:0";
      document.body.appendChild(iframe);
      metapage.setInputs("jobwire", { "greeting.txt": "hello metapage ${TOKEN}" });
    </script>`;
  // The host page lives on another origin (localhost vs 127.0.0.1: both loopback, so Chromium's
  // private-network rules stay out of the way), served by the browser itself.
  const origin = new URL(BASE);
  const hostOrigin = `http://${origin.hostname === "localhost" ? "127.0.0.1" : "localhost"}:${origin.port}`;
  await page.route(`${hostOrigin}/metapage-test/**`, (route) =>
    new URL(route.request().url()).pathname.endsWith("/metapage.js")
      ? route.fulfill({ body: library, contentType: "text/javascript" })
      : route.fulfill({ body: host, contentType: "text/html" }),
  );
  await page.goto(`${hostOrigin}/metapage-test/host.html`);
  const frame = page.frameLocator("iframe");
  await frame.locator("nav.tabs button[data-tab='inputs']").filter({ hasText: "(1)" }).waitFor({ timeout: 20_000 });
  await frame.locator("#run[data-action='run']").click();
  await page.waitForFunction(() => window.outputs["shout.txt"], null, { timeout: 60_000 });
  const output = await page.evaluate(() => window.outputs["shout.txt"]);
  assert(output.type === "base64", `an output DataRef: ${JSON.stringify(output)}`);
  const text = Buffer.from(output.value, "base64").toString();
  assert(text === `HELLO METAPAGE ${TOKEN.toUpperCase()}`, `the job saw the metaframe input: ${text}`);
  await shot(page, "14-metaframe");
  // Edits inside the frame reach the parent's definition (the metaframe's URL is the job).
  await frame.locator("nav.tabs button[data-tab='job']").click();
  await frame.locator("input[name='command']").fill(`echo edited-in-frame-${TOKEN}`);
  await page.waitForFunction(
    (token) => {
      const url = window.metapage.getDefinition().metaframes.jobwire.url;
      const job = new URL(url).hash.match(/job=([^&]+)/);
      return job && atob(decodeURIComponent(job[1])).includes(`edited-in-frame-${token}`);
    },
    TOKEN,
    { timeout: 10_000 },
  );
}

// 1. Keyboard only, and axe on the empty, running and finished pages.
async function keyboard(page) {
  // A first visit: help first, and this server's live queue offered.
  await page.goto(`${BASE}/`);
  await page.locator(".help").waitFor();
  await page.waitForFunction(() => document.querySelector("#queue")?.value === "local", null, { timeout: 10_000 });
  await page.waitForFunction(() => location.hash.includes("queue=local"), null, { timeout: 5000 }); // the URL carries it
  await axe(page, "empty");
  await shot(page, "18-first-visit-help");
  const command = `sh -c 'echo kb-start-${TOKEN}; sleep 3; echo kb-end-${TOKEN}'`;
  await page.goto("about:blank"); // a fresh load, not a hash change
  await page.goto(jobUrl({ image: BUSYBOX, command }));
  await page.waitForFunction(() => document.querySelector("#run")?.dataset.action === "run");
  const seen = [];
  for (let i = 0; i < 60 && !seen.includes("#run"); i++) {
    await page.keyboard.press("Tab");
    seen.push(await focused(page));
  }
  for (const wanted of ["#queue", "terminal", "[name=image]", "[name=command]", "#run"]) {
    assert(seen.includes(wanted), `Tab reaches ${wanted}: ${seen.join(" ")}`);
  }
  assert(seen.indexOf("terminal") < seen.indexOf("[name=image]"), "Tab leaves the terminal");
  await page.keyboard.press("Enter"); // on Run
  await waitForText(page, `kb-start-${TOKEN}`);
  assert((await state(page)) === "running", "Run from the keyboard started it");
  // The output is in the accessibility tree (xterm's screen-reader mode).
  await page.waitForFunction((t) => document.querySelector(".xterm-accessibility-tree")?.textContent.includes(t), `kb-start-${TOKEN}`, { timeout: 5000 });
  await axe(page, "running");
  await shot(page, "19-keyboard-running");
  // The documented key leaves the terminal: Escape, for the side panel (Shift+Tab leaves it too).
  await page.locator(".terminal .xterm-helper-textarea").focus();
  assert((await focused(page)) === "terminal", "the terminal takes focus");
  await page.keyboard.press("Escape");
  assert(await page.evaluate(() => document.activeElement?.classList.contains("side")), `Escape leaves the terminal: ${await focused(page)}`);
  await page.locator(".terminal .xterm-helper-textarea").focus();
  await page.keyboard.press("Shift+Tab");
  assert((await focused(page)) !== "terminal", "Shift+Tab leaves the terminal");
  await waitForState(page, "finished");
  await waitForText(page, `kb-end-${TOKEN}`);
  await axe(page, "finished");
  await shot(page, "20-keyboard-finished");
}

// 2. The queue typed after the job enables Run; an edit on a /j/{id} page keeps the queue.
async function urlstate(page) {
  const job = Buffer.from(JSON.stringify({ image: BUSYBOX, command: `echo typed-queue-${TOKEN}` })).toString("base64");
  await page.goto(`${BASE}/#?job=${encodeURIComponent(job)}`);
  await page.locator("input[name='command']").waitFor();
  // This server's live queue is offered to a URL without one; clear it to type one later.
  await page.waitForFunction(() => document.querySelector("#queue")?.value === "local", null, { timeout: 10_000 });
  await page.locator("#queue").fill("");
  await page.waitForFunction(() => document.querySelector("#run")?.disabled && document.querySelector("#status")?.textContent.includes("No queue"));
  await page.locator("#queue").pressSequentially("local", { delay: 30 }); // no Enter, no blur
  await page.waitForFunction(() => !document.querySelector("#run")?.disabled, null, { timeout: 5000 });
  await clickAction(page, "run");
  await waitForState(page, "finished");
  await waitForText(page, `typed-queue-${TOKEN}`);
  const jobId = await currentJobId(page);
  // The job's own link (`/j/{id}#?queue=…`: a job id reveals no queue, so its links carry it);
  // an edit there rewrites the URL with the queue kept.
  const link = await page.locator("a.job-id").getAttribute("href");
  assert(link === `/j/${jobId}#?queue=local`, `the job's link carries its queue: ${link}`);
  await page.goto("about:blank");
  await page.goto(`${BASE}${link}`);
  await waitForState(page, "finished");
  await page.locator("nav.tabs button[data-tab='job']").click();
  assert(new URL(page.url()).pathname === `/j/${jobId}`, "the job page is not rewritten on load");
  await page.locator("input[name='command']").fill(`echo edited-page-${TOKEN}`);
  await page.waitForFunction(
    (t) => atob(decodeURIComponent(location.hash.match(/job=([^&]+)/)?.[1] ?? "")).includes(t),
    `edited-page-${TOKEN}`,
  );
  const rewritten = page.url();
  assert(new URL(rewritten).hash.includes("queue=local"), `the rewritten URL carries the queue: ${rewritten}`);
  const again = await page.context().newPage();
  await again.goto(rewritten);
  await again.waitForFunction(() => document.querySelector("#queue")?.value === "local");
  await clickAction(again, "run");
  await waitForState(again, "finished");
  await waitForText(again, `edited-page-${TOKEN}`);
  const editedId = await currentJobId(again);
  const result = await (await fetch(`${BASE}/q/local/j/${editedId}/result.json`)).json();
  assert(result.state === "JOB_STATE_FINISHED", `the edited job ran on queue local: ${JSON.stringify(result).slice(0, 200)}`);
  await again.close();
}

// 3. A double-click on Run submits once and cancels nothing.
async function dblclick(page) {
  await page.goto(jobUrl({ image: BUSYBOX, command: `sh -c 'echo dbl-${TOKEN}; sleep 4; echo dbl-end-${TOKEN}'` }));
  await page.waitForFunction(() => document.querySelector("#run")?.dataset.action === "run");
  const submissions = [];
  page.on("request", (request) => request.url().includes("SubmitJob") && submissions.push(request.url()));
  const cancels = [];
  page.on("request", (request) => request.url().includes("CancelJob") && cancels.push(request.url()));
  await page.locator("#run").dblclick();
  await waitForText(page, `dbl-${TOKEN}`);
  const run = await page.locator("#run").boundingBox();
  const cancel = await page.locator("#cancel").boundingBox();
  assert(cancel.x + cancel.width <= run.x, "Cancel has a place of its own, left of Run");
  await page.locator("#run").dblclick({ force: true }); // on a running job: Run stays Run, disabled
  await waitForState(page, "finished");
  assert((await stateText(page)) === "Finished", `not cancelled: ${await stateText(page)}`);
  assert(submissions.length === 1 && cancels.length === 0, `one submission (${submissions.length}), no cancel (${cancels.length})`);
  await waitForText(page, `dbl-end-${TOKEN}`);
}

// 5. A shared link on a phone shows the command before Run.
async function phone(page) {
  await page.setViewportSize({ width: 390, height: 844 });
  const command = `sh -c 'echo phone-${TOKEN}; ls /'`;
  await page.goto(jobUrl({ image: BUSYBOX, command }));
  await page.waitForFunction(() => document.querySelector("#run")?.dataset.action === "run");
  const shown = page.locator("#command");
  assert(await shown.isVisible(), "the command is visible");
  assert((await shown.textContent()).includes(command), `the whole command: ${await shown.textContent()}`);
  const box = await shown.boundingBox();
  assert(box.y >= 0 && box.y + box.height <= 844, "on screen without scrolling");
  await shot(page, "21-phone-shared-link");
  // On a phone the terminal is a tab of its own: Escape leaves it for the tabs.
  await page.locator(".terminal .xterm-helper-textarea").focus();
  await page.keyboard.press("Escape");
  assert(await page.evaluate(() => document.activeElement?.dataset.tab === "job"), `Escape on a phone: ${await focused(page)}`);
  await page.goto(jobUrl({ image: `jobwire/missing-${TOKEN}:never`, command: "true" }));
  await clickAction(page, "run");
  await waitForState(page, "finished");
  assert(await page.locator("#run").isVisible(), "Run stays on screen beside a long error");
  await axe(page, "phone-failed");
  await shot(page, "22-phone-missing-image");
}

const name = process.argv[2];
if (!BASE || !scenarios[name]) {
  console.error(`usage: JOBWIRE_URL=http://… node e2e.mjs ${Object.keys(scenarios).join("|")}`);
  process.exit(2);
}
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
  ],
});
const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
await context.grantPermissions(["clipboard-read", "clipboard-write", "local-network-access"]);
const page = await context.newPage();
const problems = [];
page.on("pageerror", (error) => problems.push(`page error: ${error.message}`));
page.on("console", (message) => message.type() === "error" && problems.push(`console: ${message.text()}`));
try {
  await scenarios[name](page);
  // 404s are expected (a job not run yet); ERR_NETWORK_CHANGED is Chromium reacting to Docker
  // adding container interfaces: the page retries and reconnects.
  const expected = ["404", "NotFound", "not found", "ERR_NETWORK_CHANGED"];
  const serious = problems.filter((p) => !expected.some((e) => p.includes(e)));
  assert(serious.length === 0, `no page errors: ${serious.join("; ")}`);
  console.log(`ok ${name}`);
} catch (error) {
  await shot(page, `failed-${name}`).catch(() => {});
  for (const [i, other] of context.pages().filter((p) => p !== page).entries()) {
    await shot(other, `failed-${name}-page${i + 2}`).catch(() => {});
    console.error(`page ${i + 2}: ${other.url()}`);
  }
  console.error(`FAILED ${name}: ${error.stack || error}`);
  console.error(problems.join("\n"));
  console.error(`terminal: ${await terminalText(page).catch(() => "?")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
