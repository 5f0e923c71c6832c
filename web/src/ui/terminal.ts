// The live terminal: xterm.js with a bounded scrollback, so a job that logs for hours keeps the
// page's memory flat. The full logs stay on the server (copy fetches them from there; the page
// links them once lines were dropped). Keyboard: Tab and Shift+Tab move on as anywhere else,
// Escape leaves for the side panel; xterm's screen-reader mode mirrors the rows into the
// accessibility tree. Run chunks are written in the server's order, which is the order Docker's
// multiplexed stream delivered stdout and stderr frames in.

import { FitAddon } from "@xterm/addon-fit";
import { Terminal } from "@xterm/xterm";
import "@xterm/xterm/css/xterm.css";
import { LogStream, type LogChunk } from "../gen/jobwire/v1/jobs_pb";
import { debounce } from "./dom";

export const SCROLLBACK_LINES = 5000;

export class LogTerminal {
  private term: Terminal;
  private fit = new FitAddon();
  /** Plain text of the last lines written (bounded). */
  private tail = "";
  /** Lines written since the last clear (more than the scrollback: earlier ones were dropped). */
  private written = 0;

  constructor(
    readonly element: HTMLElement,
    /** Escape pressed in the terminal: where focus goes. */
    private leave: () => void,
  ) {
    this.term = new Terminal({
      convertEol: true,
      scrollback: SCROLLBACK_LINES,
      disableStdin: true,
      cursorBlink: false,
      cursorStyle: "bar",
      cursorInactiveStyle: "none",
      screenReaderMode: true,
      fontSize: 13,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      theme: { background: "#0f1115", foreground: "#d8dee9", selectionBackground: "#3b4252" },
    });
    this.term.loadAddon(this.fit);
    this.term.open(element);
    // xterm keeps keys for the program it assumes is attached; there is none (disableStdin), so
    // Tab / Shift+Tab take their usual meaning and Escape leaves.
    this.term.attachCustomKeyEventHandler((event) => {
      if (event.key === "Tab") return false;
      if (event.key === "Escape") {
        if (event.type === "keydown") this.leave();
        return false;
      }
      return true;
    });
    this.term.textarea?.setAttribute("aria-label", "Job output (Escape leaves)");
    const refit = debounce(() => this.resize(), 100);
    new ResizeObserver(refit).observe(element);
    this.resize();
  }

  resize(): void {
    if (this.element.offsetWidth > 0 && this.element.offsetHeight > 0) this.fit.fit();
  }

  clear(): void {
    this.term.reset();
    this.tail = "";
    this.written = 0;
  }

  /** Lines xterm holds (scrollback plus screen): bounded whatever the job logs. */
  lines(): number {
    return this.term.buffer.active.length;
  }

  /** Earlier lines fell out of the scrollback. */
  get dropped(): boolean {
    return this.written > SCROLLBACK_LINES;
  }

  /** The last ~20,000 characters written, without styling (the tests read this). */
  text(): string {
    return this.tail;
  }

  /** Run-log chunks as written by the container (ANSI colours kept). */
  writeRun(chunks: LogChunk[]): void {
    for (const chunk of chunks) {
      // stderr is only marked where the program left the colours alone.
      this.write(chunk.stream === LogStream.STDERR && !chunk.text.includes("\x1b[") ? red(chunk.text) : chunk.text, chunk.text);
    }
  }

  /** Build and pull progress, dimmed. */
  writeBuild(chunks: LogChunk[]): void {
    for (const chunk of chunks) this.write(`\x1b[2m${chunk.text}\x1b[22m`, chunk.text);
  }

  /** A note from the page itself (not the job's output). */
  note(text: string): void {
    this.write(`\x1b[36m${text}\x1b[39m\n`, `${text}\n`);
  }

  private write(styled: string, plain: string): void {
    this.term.write(styled);
    for (let i = plain.indexOf("\n"); i >= 0; i = plain.indexOf("\n", i + 1)) this.written++;
    this.tail = (this.tail + plain).slice(-20_000);
  }
}

function red(text: string): string {
  return text.replace(/[^\n]+/g, (line) => `\x1b[31m${line}\x1b[39m`);
}
