@echo off
rem FramePack Local launcher for Windows.
rem   run.bat [app options]     set up .venv on first use, then start the app on http://127.0.0.1:7860
rem   run.bat test [pytest options]
rem   run.bat cli ARGS...       generate, download, make-tiny-model
setlocal
cd /d "%~dp0"
if "%FPL_TORCH_VERSION%"=="" set FPL_TORCH_VERSION=2.13.0

where py >nul 2>nul && (set PY=py -3) || (set PY=python)
if not exist .venv\Scripts\python.exe (
  echo Creating .venv ...
  %PY% -m venv .venv || (echo FramePack Local needs Python 3.10 or newer; install it from python.org and run run.bat again. & exit /b 2)
)
set VPY=.venv\Scripts\python.exe

rem The newest CUDA build of torch the NVIDIA driver runs (framepack_local\memory\gpu_check.py); FPL_TORCH_INDEX overrides.
set TORCH_INDEX=%FPL_TORCH_INDEX%
if "%TORCH_INDEX%"=="" for /f "usebackq delims=" %%i in (`%PY% framepack_local\memory\gpu_check.py --torch-index`) do set TORCH_INDEX=%%i

set WANT_TESTS=0
if /i "%~1"=="test" set WANT_TESTS=1

rem Reinstall only when the requirements or the torch choice changed (one stamp per requirements set).
set STAMP_SRC=.venv\fpl-stamp-src.txt
(echo torch=%FPL_TORCH_VERSION% index=%TORCH_INDEX% & type requirements.txt) > %STAMP_SRC%
if not "%TORCH_INDEX%"=="" type requirements-cuda.txt >> %STAMP_SRC%
fc /b %STAMP_SRC% .venv\fpl-stamp.txt >nul 2>nul
if errorlevel 1 (
  echo Installing packages into .venv ^(first run or requirements changed^) ...
  if "%TORCH_INDEX%"=="" (
    %VPY% -m pip install -q torch==%FPL_TORCH_VERSION% || exit /b 2
  ) else (
    %VPY% -m pip install -q torch==%FPL_TORCH_VERSION% --index-url %TORCH_INDEX% || exit /b 2
    %VPY% -m pip install -q -r requirements-cuda.txt || exit /b 2
  )
  %VPY% -m pip install -q -r requirements.txt || exit /b 2
  copy /y %STAMP_SRC% .venv\fpl-stamp.txt >nul
)
if "%WANT_TESTS%"=="1" (
  fc /b requirements-test.txt .venv\fpl-stamp-test.txt >nul 2>nul
  if errorlevel 1 (
    %VPY% -m pip install -q -r requirements-test.txt || exit /b 2
    copy /y requirements-test.txt .venv\fpl-stamp-test.txt >nul
  )
)

set GRADIO_ANALYTICS_ENABLED=False
rem Pass every argument on untouched: %* keeps them all (shift/%1..%9 would drop the tenth); the
rem substitution removes the leading subcommand word.
set "ARGS=%*"
if /i "%~1"=="test" goto :test
if /i "%~1"=="cli" goto :cli
%VPY% app.py %*
exit /b %errorlevel%

:test
set "ARGS=%ARGS:*test=%"
%VPY% -m pytest -q %ARGS%
exit /b %errorlevel%

:cli
set "ARGS=%ARGS:*cli=%"
%VPY% -m framepack_local %ARGS%
exit /b %errorlevel%
