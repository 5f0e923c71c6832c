// The live terminal: xterm.js with a bounded scrollback, so a job that logs for hours keeps the
// page's memory flat. The full logs stay on the server (copy fetches them from there).

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

  constructor(readonly element: HTMLElement) {
    this.term = new Terminal({
      convertEol: true,
      scrollback: SCROLLBACK_LINES,
      disableStdin: true,
      cursorBlink: false,
      cursorStyle: "bar",
      cursorInactiveStyle: "none",
      fontSize: 13,
      fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
      theme: { background: "#0f1115", foreground: "#d8dee9", selectionBackground: "#3b4252" },
    });
    this.term.loadAddon(this.fit);
    this.term.open(element);
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
  }

  /** Lines xterm holds (scrollback plus screen): bounded whatever the job logs. */
  lines(): number {
    return this.term.buffer.active.length;
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
    this.tail = (this.tail + plain).slice(-20_000);
  }
}

function red(text: string): string {
  return text.replace(/[^\n]+/g, (line) => `\x1b[31m${line}\x1b[39m`);
}
